"""Progress display for the CLI and ``generate``: a tqdm bar on a terminal, plain periodic lines in a log.

A bar redraws itself with carriage returns, which a log file or a CI console keeps as one long line per
refresh. So where the stream is not a terminal, :func:`progress` prints a whole line at the first update,
then at most every ``interval`` seconds, and a summary line at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

#: Seconds between plain lines: a 50,000-image job at 100 images/s logs about 17 lines. The environment
#: variable FASTDIFF_PROGRESS_INTERVAL overrides it (0 prints every update).
PLAIN_INTERVAL_S = 30.0


def progress(
    total: int,
    *,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: Optional[TextIO] = None,
    interval: Optional[float] = None,
):
    """A progress display counting to ``total`` ``unit``s, starting at ``initial`` (work done before).

    Returns an object with ``update(n)`` and ``close()`` that is also a context manager: a tqdm bar when
    ``stream`` (default ``sys.stderr``) is a terminal, a :class:`PlainProgress` otherwise, and one that
    shows nothing when ``enabled`` is False. Rates and time left count only work done after ``initial``.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return NullProgress()
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    if interval is None:
        interval = float(os.environ.get("FASTDIFF_PROGRESS_INTERVAL", PLAIN_INTERVAL_S))
    return PlainProgress(total, desc=desc, unit=unit, initial=initial, stream=stream, interval=interval)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class NullProgress:
    """Shows nothing (progress turned off, or a rank other than 0)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlainProgress(NullProgress):
    """Whole lines, no carriage returns: ``desc: n/total unit (p%), rate unit/s, time left``."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int, stream: TextIO, interval: float):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.n = self.initial = initial
        self.start = time.perf_counter()
        self.last_print: Optional[float] = None
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.last_print is None or now - self.last_print >= self.interval:
            self._print(self._status(now), now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.perf_counter()
        seconds = now - self.start
        rate = f"{self._rate(seconds):.3g} {self.unit}/s"
        self._print(f"{self.desc}: {self.n}/{self.total} {self.unit} in {_clock(seconds)}, {rate}", now)

    def _rate(self, seconds: float) -> float:
        return (self.n - self.initial) / seconds if seconds > 0 else 0.0

    def _status(self, now: float) -> str:
        rate = self._rate(now - self.start)
        left = f"{_clock((self.total - self.n) / rate)} left" if rate > 0 else "time left unknown"
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} {self.unit}/s, {left}"

    def _print(self, line: str, now: float) -> None:
        print(line, file=self.stream, flush=True)
        self.last_print = now


def _clock(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
