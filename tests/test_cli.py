"""The command line refuses bad values before anything starts."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", ["sink", "stream"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_batch_max_must_be_a_positive_whole_number(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from usertrail.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--batch-max", value])
    assert exited.value.code == 2
    assert "--batch-max" in capsys.readouterr().err
    assert build_parser().parse_args([command, "--batch-max", "7"]).batch_max == 7
