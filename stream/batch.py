"""A batch of the worker's events folded as bytes in, bytes out.

The worker hands ``fold_users`` each changed user's table value and raw
records; it gets back the new table value and the profile message to
publish. Pure but for a bounded memo of decoded states, so it runs the same
in the worker's own process or in a helper process (``FoldProcess``): there
decoding and folding, most of a batch's CPU, run on another core while
faust's consumer keeps fetching and buffering the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from usertrail.producers.events import EventBase, accept
from usertrail.producers.profiles import encode_profile
from usertrail.stream.fold import NeedChunks, decode_chunk, encode_chunk
from usertrail.stream.segments import Rules
from usertrail.stream.state import UserState, advance, dump_state, load_state

from usertrail.embedded import _die_with_parent
from usertrail.runtime import tune_gc

log = logging.getLogger("usertrail.stream")

DECODED_STATES = 20_000
"""Users whose decoded state is kept beside the bytes it was decoded from."""


class UserBatch(NamedTuple):
    key: bytes  # the user id in UTF-8: the records' key and the table's
    state: bytes | None  # the user's table value before the batch
    records: list[tuple[bytes, int, int]]  # (value, offset, timestamp ms) in log order
    # sealed chunks of the user's event ids (index -> stored value), as Wanted
    chunks: dict[int, bytes] | None = None


class Folded(NamedTuple):
    state: bytes  # the new table value
    message: bytes | None  # the profile to publish; None: a tombstone
    chunks: tuple[tuple[int, bytes], ...] = ()  # chunks sealed by the batch, to store


class Wanted(NamedTuple):
    """The user's batch needs these sealed chunks (stream/fold.py): fold it
    again with them in ``UserBatch.chunks``."""

    chunks: tuple[int, ...]


Result = Folded | Wanted | None
"""What ``fold_users`` answers for one user."""

_decoded: dict[bytes, tuple[bytes, UserState]] = {}


def _state_of(key: bytes, raw: bytes | None) -> UserState | None:
    hit = _decoded.pop(key, None)
    if hit is not None and hit[0] == raw:
        _decoded[key] = hit  # most recently used last
        return hit[1]
    return load_state(raw)


def _remember(key: bytes, raw: bytes, state: UserState) -> None:
    _decoded.pop(key, None)
    _decoded[key] = (raw, state)
    if len(_decoded) > DECODED_STATES:
        del _decoded[next(iter(_decoded))]


def fold_users(users: Sequence[UserBatch], rules: Rules) -> list[Result]:
    """Per user, in order: the state and message after its records, or None
    when they change nothing (all redelivered, resent or not valid events:
    the sink dead-letters those), or the sealed chunks it needs (Wanted)."""
    out: list[Result] = []
    for key, raw, records, stored in users:
        events: list[tuple[EventBase, int]] = []
        for value, offset, timestamp in records:
            event = accept(key, value, timestamp)  # accepted: the key is the event's user id
            if event is not None:
                events.append((event, offset))
        result = None
        if events:
            chunks = {i: decode_chunk(v) for i, v in (stored or {}).items()}
            try:
                result = advance(_state_of(key, raw), events[0][0].user_id, events, rules, chunks)
            except NeedChunks as need:
                out.append(Wanted(tuple(sorted(need.indices))))
                continue
        if result is None:
            out.append(None)
            continue
        value = dump_state(result.state)
        _remember(key, value, result.state)
        message = None if result.message is None else encode_profile(result.message)
        sealed = tuple((i, encode_chunk(ids)) for i, ids in sorted(result.chunks.items()))
        out.append(Folded(value, message, sealed))
    return out


# --- the helper process ----------------------------------------------------
# Frames both ways: 4-byte big-endian length, then a pickle. The first frame
# to the helper is the rules; then one frame per batch, answered by one.
# Pickles only ever pass between a worker and the helper it started.

_HEADER = struct.Struct(">I")
_DIED = (ConnectionError, asyncio.IncompleteReadError)  # what a helper's death raises here
_PIPE_LIMIT = 4 * 1024 * 1024


def serve() -> None:
    """The helper process: fold every batch that arrives, until end of input
    (the worker closed the pipe, or died)."""
    _die_with_parent()  # and killed with the worker, even mid-batch
    # a terminal's Ctrl-C reaches the whole process group: the worker stops
    # this process once its last batch is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_gc()
    source, sink = sys.stdin.buffer, sys.stdout.buffer

    def read() -> Any:
        header = source.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        size = _HEADER.unpack(header)[0]
        frame = source.read(size)
        if len(frame) < size:  # the worker died half way through a frame
            return None
        return pickle.loads(frame)

    rules = Rules.model_validate(read())
    while (users := read()) is not None:
        answer = pickle.dumps(fold_users(users, rules), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sink.write(_HEADER.pack(len(answer)) + answer)
            sink.flush()
        except BrokenPipeError:  # the worker died while this batch was folded
            os._exit(0)  # nobody to answer, nor to read a traceback


class FoldProcess:
    """``fold_users`` in one helper process (``serve``), started on first
    use and talked to over pipes from the event loop itself, with no thread
    in between. One batch at a time (the worker awaits each), so the
    helper's memo follows the table. A helper that dies is replaced and the
    batch folded again: the function is pure, so a second try gives what
    the first would have.

    A batch the helper dies on twice holds a record that kills it (a crash,
    memory): the batch is folded again in halves, by users and then by a
    user's records, each half in a fresh helper if it dies too, down to the
    one record the helper dies on twice by itself. That record is left
    out, as a record that is not a valid event is (the sink dead-letters
    it), and said in the log; the rest of the batch is folded, so the
    partition goes on."""

    COMMAND = ("-c", "from usertrail.stream.batch import serve; serve()")

    def __init__(self, rules: Rules) -> None:
        self._rules = rules.model_dump(by_alias=True)
        self._proc: asyncio.subprocess.Process | None = None
        self.left_out: list[tuple[bytes, int]] = []  # (user key, offset) of records left out

    async def start(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.COMMAND,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=_PIPE_LIMIT,
            )
            self._send(self._rules)

    def _send(self, value: Any) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.write(_HEADER.pack(len(data)) + data)

    async def fold(self, users: Sequence[UserBatch]) -> list[Result]:
        try:
            return await self._fold(users)
        except _DIED as exc:
            log.warning("the fold helper died (%r); starting another", exc)
            await self.close()
        try:
            return await self._fold(users)
        except _DIED as exc:
            log.error(
                "the fold helper died again on a batch of %d users (%r): folding it in parts "
                "to find the record it dies on",
                len(users),
                exc,
            )
            await self.close()
            return await self._in_parts(list(users))

    async def _try(self, users: list[UserBatch]) -> list[Result] | None:
        """The batch folded, or None if the helper died on it."""
        try:
            return await self._fold(users)
        except _DIED:
            await self.close()
            return None

    async def _in_parts(self, users: list[UserBatch]) -> list[Result]:
        if len(users) > 1:
            out: list[Result] = []
            for part in (users[: len(users) // 2], users[len(users) // 2 :]):
                folded = await self._try(part)
                out += folded if folded is not None else await self._in_parts(part)
            return out
        user = users[0]
        if len(user.records) > 1:
            half = len(user.records) // 2
            first = await self._one(user._replace(records=user.records[:half]))
            if isinstance(first, Wanted):
                return [first]
            state = user.state if first is None else first.state
            chunks = dict(user.chunks or {})
            sealed = () if first is None else first.chunks
            chunks.update(sealed)
            second = await self._one(
                user._replace(state=state, records=user.records[half:], chunks=chunks)
            )
            if isinstance(second, Folded):  # with what the first half sealed
                return [second._replace(chunks=sealed + second.chunks)]
            return [second if second is not None else first]
        # one record, which the helper died on: once more, on its own
        folded = await self._try(users)
        if folded is not None:
            return folded
        offset = user.records[0][1] if user.records else -1
        log.error(
            "the fold helper died twice on the record at offset %d (user %r): it is left "
            "out of the profile, as a record that is not a valid event is",
            offset,
            user.key[:200],
        )
        self.left_out.append((user.key, offset))
        return [None]

    async def _one(self, user: UserBatch) -> Result:
        folded = await self._try([user])
        return (folded if folded is not None else await self._in_parts([user]))[0]

    async def _fold(self, users: Sequence[UserBatch]) -> list[Result]:
        await self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            self._send(list(users))
            await proc.stdin.drain()
            header = await proc.stdout.readexactly(_HEADER.size)
            answer = await proc.stdout.readexactly(_HEADER.unpack(header)[0])
        except BaseException:
            # cancelled or failed half way: the pipes are out of step, so
            # this helper never answers another batch
            self._proc = None
            if proc.returncode is None:
                proc.kill()
            raise
        result: list[Result] = pickle.loads(answer)
        return result

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # end of input: the helper exits
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
