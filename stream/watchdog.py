"""The stream worker's watchdog: a worker that is stuck says so, tries to
get going again, and else stops so that its supervisor starts it again.

Checked every few seconds, from the moment faust's worker starts (a task
of its own: faust's start waits for good on a broker that answers nothing,
and its timers wait for its start):

- **Table recovery that stopped moving.** faust recovers a table by
  reading its changelog partitions up to the offsets it found at the start
  of a round, and waits for that without a time limit. On Apache Kafka,
  after a member was SIGKILLed, the survivor was seen to wait for good:
  not one changelog record reached the recovery after its seek ("No event
  received for active tp ... since recovery start"). faust's consumer hands
  the fetcher the set of partitions to return, and an empty set means all;
  during a rebalance that set is empty, so a fetch already under way can
  return the changelog records recovery just sought to while faust's flow
  is still stopped, and faust drops them; nothing fetches them again. When
  the recovered offsets have not moved for ``RECOVERY_STALL_SECONDS``, the
  watchdog starts the round again as a rebalance does
  (``signal_recovery_start``): faust seeks every active changelog
  partition to what it has applied and reads on from there.
- **No assignment.** A worker whose group never finished a rebalance (no
  assignment since the last one began, an empty one included) for
  ``stall_seconds``.
- **No progress while behind.** Partitions of the events topic with
  records past their applied offset and nothing folded for
  ``stall_seconds`` (undelivered records are re-read well before that,
  ``BatchFolder.reread_undelivered``).
- **Recovery that stays stuck** after it was started again, for
  ``stall_seconds`` in all.

The last three stop the worker with ``StalledError`` (exit code 6):
``usertrail up`` starts it again, as a deployment's supervisor would.
``health()`` says what the watchdog sees (``GET /health``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from usertrail.stream.folder import BatchFolder

from usertrail.errors import StalledError
from usertrail.settings import Settings

log = logging.getLogger("usertrail.stream")

RECOVERY_STALL_SECONDS = 15.0
"""Seconds without a changelog record recovered before a round starts again."""
CHECK_SECONDS = 5.0


class Watchdog:
    def __init__(
        self,
        app: Any,
        folder: BatchFolder,
        settings: Settings,
        *,
        stop: Callable[[StalledError], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``app``: the faust app (``tables.recovery``, ``consumer``);
        ``stop(error)``: stops the worker."""
        self.app = app
        self.folder = folder
        self.settings = settings
        self.stop = stop
        self.clock = clock
        self.unassigned_since: float | None = clock()
        self.recovery_seen: dict[Any, int] | None = None
        self.recovery_moved_at = 0.0
        self.recovery_stuck_since: float | None = None
        self.restarts = 0
        self.rebalancing_since: float | None = None
        self.stalled: StalledError | None = None
        self.state = "starting"

    # the app's rebalance signals
    def revoked(self) -> None:
        self.unassigned_since = self.clock()
        self.state = "rebalancing"

    def assigned(self) -> None:
        self.unassigned_since = None

    def health(self) -> tuple[bool, str]:
        """Healthy or not, and what the worker is doing."""
        if self.stalled is not None:
            return False, str(self.stalled)
        if self.state in ("starting", "rebalancing") and self._settled():
            # as the next check will say (it runs every CHECK_SECONDS)
            self.state = "serving"
        return True, self.state

    def _settled(self) -> bool:
        """Assigned, not rebalancing, not recovering: serving."""
        return (
            self.unassigned_since is None
            and not self.app.rebalancing
            and not self.app.tables.recovery.in_recovery
        )

    async def run(self) -> None:
        """Check every ``CHECK_SECONDS`` until the worker stalls, or begins
        to stop (its folder closes)."""
        while self.stalled is None:
            await asyncio.sleep(CHECK_SECONDS)
            if self.folder.closing:
                return  # the worker is stopping: what a check reads is going away
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001  # a watchdog that dies watches nothing: say it, go on
                if self.folder.closing:
                    return  # it began stopping meanwhile (faust's consumer loop closed)
                log.warning("the watchdog's check failed: %r", exc)

    async def check(self) -> None:
        if self.stalled is not None:
            return
        now, bound = self.clock(), self.settings.stall_seconds
        recovery = self.app.tables.recovery
        if recovery.in_recovery:
            self.state = "recovering"
            self._check_recovery(recovery, now, bound)
            return
        self.recovery_seen, self.recovery_stuck_since = None, None
        if self.unassigned_since is not None:
            if now - self.unassigned_since > bound:
                self._stalled(
                    f"no partitions assigned for {now - self.unassigned_since:.0f} s: the "
                    f"group '{self.settings.stream_app_id}' did not form, or the broker did "
                    "not answer"
                )
            return
        if self.app.rebalancing:
            self.rebalancing_since = self.rebalancing_since or now
            if now - self.rebalancing_since > bound:
                self._stalled(
                    f"a rebalance not finished after {now - self.rebalancing_since:.0f} s"
                )
            return
        self.rebalancing_since = None
        self.state = "serving"
        behind = await self._behind()
        if not behind:
            self.folder.folded_at = now  # idle, not stuck: the bound counts from here
        elif now - self.folder.folded_at > bound:
            self._stalled(
                f"nothing folded for {now - self.folder.folded_at:.0f} s while behind: {behind}"
            )

    def _check_recovery(self, recovery: Any, now: float, bound: float) -> None:
        offsets = dict(recovery.active_offsets)
        if offsets != self.recovery_seen:
            self.recovery_seen, self.recovery_moved_at = offsets, now
            self.recovery_stuck_since = None
            return
        if now - self.recovery_moved_at < RECOVERY_STALL_SECONDS:
            return
        if self.recovery_stuck_since is None:
            self.recovery_stuck_since = self.recovery_moved_at
        if now - self.recovery_stuck_since > bound:
            self._stalled(
                f"table recovery made no progress for {now - self.recovery_stuck_since:.0f} s "
                f"({self.restarts} restarts of it)"
            )
            return
        if recovery.active_remaining_total() <= 0:
            return  # nothing left to read, only to finish: bounded by the above
        behind = {
            f"{tp.topic}[{tp.partition}]": f"{offsets.get(tp)} of {high}"
            for tp, high in recovery.active_highwaters.items()
            if high > offsets.get(tp, -1)
        }
        self.restarts += 1
        log.warning(
            "table recovery made no progress for %.0f s (recovered up to: %s); starting it again",
            now - self.recovery_moved_at,
            behind,
        )
        recovery.signal_recovery_start.set()  # what a rebalance does: seek, then read on
        self.recovery_moved_at = now

    async def _behind(self) -> str:
        """Partitions of the events topic with records past their applied offset."""
        out = []
        consumer = self.app.consumer
        for tp in sorted(consumer.assignment()):
            if tp.topic != self.settings.events_topic:
                continue
            try:
                high = consumer.highwater(tp)
            except AssertionError:  # revoked meanwhile
                continue
            applied = await self.folder.applied_or_before_start(tp.partition)
            if high is not None and applied is not None and high > applied + 1:
                out.append(f"{tp.topic}[{tp.partition}] applied {applied} of {high}")
        return ", ".join(out)

    def _stalled(self, why: str) -> None:
        self.stalled = StalledError(f"the stream worker stalled ({why}); exiting to start again")
        self.state = "stalled"
        log.error("%s", self.stalled)
        self.stop(self.stalled)
