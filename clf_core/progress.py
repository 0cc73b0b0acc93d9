"""Progress of a long pass: done / total, rate and ETA, at a steady cadence.

On a terminal it is a tqdm bar; anywhere else (`ray job logs`, a cron mail, a file) it is a log
line every `every_s` seconds, so a night of millions of rows says how far it is without flooding
the log:

    12:03:10 INFO scoring: 40,960 / 112,000 distinct texts (36.6%), 1,812/s, ETA 39s
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("clf_core.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, what: str, total: int, unit: str = "rows", every_s: float = 30.0,
                 clock=time.monotonic, terminal: bool | None = None):
        self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
        self.done = 0
        self.started = self.last = clock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=f" {unit}", desc=what, unit_scale=True, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 and left > 0 else ("0s" if left <= 0 else "unknown")
        return (f"{self.what}: {self.done:,} / {self.total:,} {self.unit}{share}, {rate:,.0f}/s, "
                f"ETA {eta}, {_duration(elapsed)} so far")

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s%s", self.line(), f" | {note}" if note else "")

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s%s", self.line().replace(", ETA 0s", ", done"), f" | {note}" if note else "")
