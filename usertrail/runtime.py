"""Process-wide settings for the long-running pipeline processes."""

from __future__ import annotations

import gc

# Young collections every 50,000 net allocations instead of 700; a full one
# after 20 x 10 of them (every 10 million allocations: about 100,000 events).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Collect less often in a process that decodes events all day.

    Each decoded event is a few dozen short-lived objects, nearly all freed by
    reference counting; with CPython's default thresholds the cycle collector
    still runs every 700 allocations and walks every object alive, which
    measured more than half of the sink's decoding time. What is alive once
    the process has started (modules, settings, rules) is frozen out of the
    collector's reach, and collections run less often; cycles are still
    collected, only later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
