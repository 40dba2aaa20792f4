"""Which records the worker folds: exactly the next one of each partition."""

from __future__ import annotations

from usertrail.stream.policy import RESEEK_SECONDS, SKIP_AHEAD, Positions, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_next_offset_folds_and_older_ones_are_done() -> None:
    p = Positions()
    assert p.admit(0, 5, None) is Verdict.FOLD  # nothing applied yet
    assert p.admit(0, 6, 5) is Verdict.FOLD
    assert p.admit(0, 5, 5) is Verdict.DONE
    assert p.admit(0, 0, 5) is Verdict.DONE


def test_a_hole_is_refused_until_the_re_read_brings_it() -> None:
    clock = Clock()
    p = Positions(clock)
    assert p.admit(1, 9, 5) is Verdict.GAP
    assert p.should_seek(1, 6)
    # records fetched before the seek keep coming: still refused, no new seek
    assert p.admit(1, 10, 5) is Verdict.GAP
    assert p.admit(1, 11, 5) is Verdict.GAP
    assert not p.should_seek(1, 6)
    # the re-read arrives at the missing offset
    assert p.admit(1, 6, 5) is Verdict.FOLD
    assert p.resync == {}


def test_a_hole_is_never_skipped_even_when_offsets_go_back() -> None:
    p = Positions(Clock())
    assert p.admit(2, 9, 5) is Verdict.GAP
    assert p.should_seek(2, 6)
    assert p.admit(2, 12, 5) is Verdict.GAP
    # faust seeking to a committed offset past the hole: still refused
    assert p.admit(2, 8, 5) is Verdict.GAP
    assert p.admit(2, 6, 5) is Verdict.FOLD


def test_seeks_again_when_the_re_read_never_comes() -> None:
    clock = Clock()
    p = Positions(clock)
    assert p.admit(0, 9, 5) is Verdict.GAP
    assert p.should_seek(0, 6)
    clock.now += RESEEK_SECONDS - 1
    assert not p.should_seek(0, 6)
    clock.now += 2
    assert p.should_seek(0, 6)


def test_partitions_are_independent() -> None:
    p = Positions(Clock())
    assert p.admit(0, 9, 5) is Verdict.GAP
    assert p.should_seek(0, 6)
    assert p.admit(1, 6, 5) is Verdict.FOLD
    assert set(p.resync) == {0}


def test_far_below_the_applied_offset_the_worker_jumps_ahead_once() -> None:
    clock = Clock()
    p = Positions(clock)
    # a replay left the state at 50,000; the group offset still says 10
    assert p.skip_to(0, 10, 50_000) == 50_001
    assert p.skip_to(0, 11, 50_000) is None  # in flight from before the jump
    assert p.skip_to(0, 49_500, 50_000) is None  # close enough: skipped one by one
    clock.now += RESEEK_SECONDS
    assert p.skip_to(0, 12, 50_000) == 50_001  # the jump did not take: again
    assert p.skip_to(1, 0, SKIP_AHEAD) == SKIP_AHEAD + 1  # partitions are apart
