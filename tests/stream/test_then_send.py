"""A batch's applied offsets are sent only after its other writes succeed:
a recovered applied offset must imply every write before it."""

from __future__ import annotations

import asyncio

import pytest
from usertrail.stream.policy import then_send


async def test_nothing_is_sent_while_a_write_is_unacknowledged() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    sent: list[str] = []

    async def send() -> list[asyncio.Future[None]]:
        sent.append("marks")
        done = loop.create_future()
        done.set_result(None)
        return [done]

    task = asyncio.ensure_future(then_send([first, second], send))
    first.set_result(None)
    await asyncio.sleep(0.01)
    assert sent == [] and not task.done()
    second.set_result(None)
    await asyncio.wait_for(task, 1)
    assert sent == ["marks"]


async def test_a_failed_write_sends_nothing_and_says_why() -> None:
    loop = asyncio.get_running_loop()
    ok, failed = loop.create_future(), loop.create_future()
    sent: list[str] = []
    ok.set_result(None)
    failed.set_exception(ConnectionError("broker refused the state write"))
    with pytest.raises(ConnectionError, match="refused the state write"):

        async def send() -> list[asyncio.Future[None]]:
            sent.append("marks")
            return []

        await then_send([ok, failed], send)
    assert sent == []


async def test_a_failed_mark_is_reported_too() -> None:
    loop = asyncio.get_running_loop()
    mark = loop.create_future()
    mark.set_exception(TimeoutError("mark not acknowledged"))
    with pytest.raises(TimeoutError):

        async def send() -> list[asyncio.Future[None]]:
            return [mark]

        await then_send([], send)
