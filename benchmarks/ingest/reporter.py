"""A training function that only reports: `rate` times a second, `budget` reports (benchmarks/driver_ingest.py)."""

from __future__ import annotations

import time


def main(config: dict, ctx) -> None:  # type: ignore[no-untyped-def]
    period = 1.0 / float(config["rate"])
    start = time.perf_counter()
    for step in range(1, ctx.budget + 1):
        ctx.report(step, {"loss": 1.0 / step, "eval/score": float(step)})
        delay = start + step * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
