"""Wall-clock timing of several things that take turns, shared by the benchmark harness and the export report."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping


def round_robin_seconds(fns: Mapping[str, Callable[[], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of every run of each function (each must block until its work is done), over ``rounds`` rounds.

    The functions take turns within every round (one run of each), so that a shared machine's drift in speed, or a
    burst of load from other jobs, slows every one of them alike instead of whichever was being timed.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
