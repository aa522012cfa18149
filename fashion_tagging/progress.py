"""Progress lines for long tasks, so an Airflow task log shows how far a run is and how fast it goes.

    progress = ProgressLogger(total=len(products), unit="products", logger=log, every_s=10, batches=n_batches)
    for batch in batches:
        ...
        progress.update(len(batch))   # one call per finished batch
    progress.finish()                  # always logs the final line

logs lines like ``batch 3/45: 3000/44441 products (6.8%), 412.5 products/s, eta 101s``.
"""

from __future__ import annotations

import logging
import time


class ProgressLogger:
    """Counts finished batches and units; logs at most once every ``every_s`` seconds (plus the last line)."""

    def __init__(self, total: int, unit: str = "products", logger: logging.Logger | None = None,
                 every_s: float = 10.0, *, batches: int | None = None, clock=time.monotonic):
        self.total = max(0, int(total))
        self.unit = unit
        self.logger = logger or logging.getLogger(__name__)
        self.every_s = every_s
        self.batches = batches
        self.batch = 0
        self.done = 0
        self._clock = clock
        self._started = clock()
        self._last_logged: float | None = None
        self._logged_batch = -1

    def update(self, units: int) -> None:
        """Record one finished batch of ``units``; logs when ``every_s`` has passed since the last line."""
        self.batch += 1
        self.done += int(units)
        now = self._clock()
        if self._last_logged is None or now - self._last_logged >= self.every_s:
            self._log(now)

    def finish(self) -> None:
        """Log the final totals, whatever the interval (once: not again if the last batch was logged)."""
        if self._logged_batch != self.batch:
            self._log(self._clock())

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = self._clock() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The current progress line (what :meth:`update` logs)."""
        batch = f"batch {self.batch}/{self.batches}" if self.batches else f"batch {self.batch}"
        rate = self.rate
        share = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        remaining = max(0, self.total - self.done)
        eta = f", eta {remaining / rate:.0f}s" if rate > 0 and remaining else ""
        return f"{batch}: {self.done}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s{eta}"

    def _log(self, now: float) -> None:
        self._last_logged = now
        self._logged_batch = self.batch
        self.logger.info("%s", self.line())
