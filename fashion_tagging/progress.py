"""Progress of long work, as log lines a person can follow: in an Airflow task log and in ``make demo``.

* :class:`ProgressLogger` counts finished batches of a long loop (photos embedded, products
  tagged) and logs ``image embeddings: 3000/14000 img (21.4%), 54.2 img/s, eta 3m23s`` at most
  every ``every_s`` seconds, plus a last line.
* :func:`epoch_logger` is a Keras callback logging one line per training epoch.
* :class:`DagRunFollower` turns the output of ``airflow dags test`` into a compact live view: which
  task runs, how long it took, and this package's own log lines (the two above among them).
"""

from __future__ import annotations

import logging
import re
import resource
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m20s``, ``1h05m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def peak_rss_mib() -> float:
    """Peak resident memory of this process (and finished children), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def resident_memory_mib() -> dict[str, float]:
    """This process's resident memory now, split as Linux counts it (``/proc/self/status``), in MiB.

    ``anonymous``: heap and other private memory, which only the process can give back;
    ``file``: pages of memory-mapped files (the feature store's shards), which the kernel drops
    under pressure and re-reads. Empty where ``/proc`` has no such lines.
    """
    fields = {"RssAnon:": "anonymous", "RssFile:": "file", "RssShmem:": "shared"}
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return {}
    return {fields[parts[0]]: int(parts[1]) / 1024 for parts in map(str.split, lines) if parts and parts[0] in fields}


class ResidentMemorySampler:
    """Tracks the peak of each kind of resident memory (see :func:`resident_memory_mib`) in a thread.

    ``ru_maxrss`` counts mapped file pages and heap alike; sampled every ``every_s`` seconds,
    this tells them apart (a peak shorter than the interval can be missed). A context manager.
    """

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resident-memory-sampler", daemon=True)

    def sample(self) -> dict[str, float]:
        """Sample now; returns the peaks so far (MiB, rounded)."""
        for kind, mib in resident_memory_mib().items():
            self.peak[kind] = max(self.peak.get(kind, 0.0), mib)
        return {kind: round(mib) for kind, mib in self.peak.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "ResidentMemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class ProgressLogger:
    """Counts finished batches and units; logs at most once every ``every_s`` seconds (plus the last line)."""

    def __init__(self, total: int, unit: str = "products", logger: logging.Logger | None = None,
                 every_s: float = 10.0, *, batches: int | None = None, label: str | None = None,
                 clock=time.monotonic):
        self.total = max(0, int(total))
        self.unit = unit
        self.label = label
        self.logger = logger or log
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
        prefix = self.label or (f"batch {self.batch}/{self.batches}" if self.batches else f"batch {self.batch}")
        rate = self.rate
        share = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        remaining = max(0, self.total - self.done)
        eta = f", eta {format_seconds(remaining / rate)}" if rate > 0 and remaining else ""
        return f"{prefix}: {self.done}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s{eta}"

    def _log(self, now: float) -> None:
        self._last_logged = now
        self._logged_batch = self.batch
        self.logger.info("%s", self.line())


def epoch_logger(stage: str, epochs: int, monitor: str | None = None, logger: logging.Logger | None = None):
    """A Keras callback logging ``<stage> epoch 3/12: loss 0.41, articleType_acc 0.812, val 0.790 (61s)``.

    Keras' own ``verbose`` output is a progress bar for a terminal; this one line per epoch is what a
    task log (and the demo following it) can show. ``monitor`` names the metric to report (its
    ``val_`` twin too); without it, the loss.
    """
    import keras

    logger = logger or log

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"loss {logs['loss']:.3f}"] if "loss" in logs else []
            if monitor and monitor in logs:
                parts.append(f"{monitor} {logs[monitor]:.4f}")
            if monitor and f"val_{monitor}" in logs:
                parts.append(f"val {logs[f'val_{monitor}']:.4f}")
            logger.info("%s epoch %d/%d: %s (%s)", stage, epoch + 1, epochs, ", ".join(parts),
                        format_seconds(time.monotonic() - self._started))

    return EpochLog()


# One line of ``airflow dags test`` output (structlog's console format):
#   2026-11-29T21:44:37.097693Z [info     ] message [logger.name] loc=pipeline.py:228 key=value
_LOG_LINE = re.compile(r"^\S+T(?P<time>\d\d:\d\d:\d\d)\S*Z \[(?P<level>\w+)\s*\] (?P<message>.*?)\s+"
                       r"\[(?P<logger>[\w.]+)\](?: (?P<fields>.*)|$)")
_NEW_STATE = re.compile(r"\bnew_state=(?P<state>failed|up_for_retry)\b")
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")


class DagRunFollower:
    """Prints a compact live view of an ``airflow dags test`` run from its output lines.

    Shown: each task's start and end (with its duration), this package's info and warning lines
    (progress, epochs, decisions), and error lines from anywhere. The full output is in the run's
    log file; lines longer than ``width`` are cut here only.
    """

    def __init__(self, echo: Callable[[str], None] = print, *, package: str = "fashion_tagging", width: int = 160):
        self.echo = echo
        self.package = package
        self.width = width
        self._started: dict[str, int] = {}  # task -> second of the day it started (from its log line)
        self._exception: str | None = None  # last line of a traceback being printed after an error line

    def __call__(self, line: str) -> None:
        match = _LOG_LINE.match(line)
        if match is None:  # a traceback's lines: its last unindented one names the exception
            if self._exception is not None and line[:1].strip():
                self._exception = line
            return
        if self._exception:
            self.echo(f"            {self._exception[:self.width - 12]}")
        self._exception = None
        message, level, logger = match["message"], match["level"], match["logger"]
        if (start := _TASK_START.search(message)) is not None:
            name = self._task_name(start)
            self._started[name] = _second_of_day(match["time"])
            self._show(match["time"], f"{name} ...")
        elif (end := _TASK_END.search(message)) is not None:
            name = self._task_name(end)
            took = (_second_of_day(match["time"]) - self._started.pop(name, _second_of_day(match["time"]))) % 86400
            self._show(match["time"], f"{name} finished in {format_seconds(took)}")
        elif level in ("error", "critical") or (
                logger.split(".")[0] == self.package and level in ("info", "warning")
                and not message.startswith("Done. Returned value")):
            prefix = "" if level == "info" else f"{level.upper()}: "
            self._show(match["time"], f"  {prefix}{message}")
            if level in ("error", "critical"):
                self._exception = ""
        elif (state := _NEW_STATE.search(match["fields"] or "")) is not None:
            self._show(match["time"], f"  task {state['state'].replace('_', ' ')}")

    @staticmethod
    def _task_name(match: re.Match) -> str:
        return match["task"] if int(match["index"]) < 0 else f"{match['task']}[{match['index']}]"

    def _show(self, clock_time: str, text: str) -> None:
        line = f"   {clock_time} {text}"
        self.echo(line if len(line) <= self.width else line[:self.width - 1] + "…")


def _second_of_day(clock_time: str) -> int:
    hours, minutes, seconds = (int(part) for part in clock_time.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def task_log_lines(log_path, task_id: str, tail: int = 40) -> list[str]:
    """The last ``tail`` output lines of ``task_id``'s last attempt (from its start to its end) in a run log."""
    lines: list[str] | None = None  # None until the task starts
    with open(log_path, errors="replace") as file:
        for line in file:
            start = _TASK_START.search(line)
            if start is not None and start["task"] == task_id:
                lines = []
            if lines is None:
                continue
            lines.append(line.rstrip("\n"))
            end = _TASK_END.search(line)
            if end is not None and end["task"] == task_id:
                break
    return (lines or [])[-tail:]
