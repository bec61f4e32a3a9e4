"""Progress of long work on stderr: a tqdm bar on a terminal, plain periodic lines elsewhere, or nothing.

One decision for the whole toolkit (`style`): quiet turns progress off, a terminal (or a notebook)
gets tqdm bars, and a pipe or log file gets lines such as "lanczos: 12/300 matvecs, 4.1 s": at most
one every $LANDSCAPE_PROGRESS_INTERVAL seconds (default 10) across all phases of the process, and a
final line for each phase that printed one. Work shorter than the interval stays silent, so a piped
run is never minutes of silence and a quick one prints nothing but its result.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

from landscape.engine import distributed as ranks

T = TypeVar("T")
STYLES = ("bar", "lines", "off")
INTERVAL_VARIABLE = "LANDSCAPE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0

_lock = threading.Lock()
_last_line: list[float | None] = [None]  # when this process last printed a progress line (shared by every phase)
_working_on: list[str] = []  # what the phases started now are for (a checkpoint, a run), outermost first


@contextmanager
def working_on(label: str) -> Iterator[None]:
    """Name what the phases inside are for ("sgd B=32 seed 0", "ΔL prediction"): each one's bar and lines start with it."""
    _working_on.append(label)
    try:
        yield
    finally:
        _working_on.pop()


def style(quiet: bool = False, stream: TextIO | None = None) -> str:
    """How to show progress: "off" when quiet or not rank 0, "bar" on a terminal or in a notebook, else "lines"."""
    if quiet or not ranks.is_main():
        return "off"
    stream = sys.stderr if stream is None else stream
    interactive = getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules
    return "bar" if interactive else "lines"


def resolve(setting: bool | str | None) -> str:
    """An estimator's `progress` argument as a style: False/None/"off" → off, True/"auto" → `style()`."""
    if setting is None or setting is False or setting == "off":
        return "off"
    if setting is True or setting == "auto":
        return style()
    if setting in STYLES:
        return setting if ranks.is_main() else "off"
    raise ValueError(f"progress must be True, False or one of {', '.join(STYLES)}, 'auto'; got {setting!r}")


def interval() -> float:
    """Seconds between plain progress lines: $LANDSCAPE_PROGRESS_INTERVAL (0 prints every update), default 10."""
    text = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise ValueError(f"{INTERVAL_VARIABLE}={text!r} is not a number of seconds ≥ 0")
    return value


class Progress:
    """Progress of one phase (`total` units of `unit`): a context manager with `update(n)` and `set_postfix(**values)`.

    `enabled` is an estimator's `progress` argument (see `resolve`). In "lines" style a background
    thread keeps printing while a single long step runs (one `products` call of 50 probes, one training epoch).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "step",
        enabled: bool | str = True,
        *,
        initial: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        desc = ": ".join([*_working_on, desc])
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.style = resolve(enabled)
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.postfix = ""
        self.printed = False
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.style == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream)
        elif self.style == "lines":
            self.interval = interval()
            with _lock:
                if _last_line[0] is None:
                    _last_line[0] = self.start
            if self.interval > 0:
                self._thread = threading.Thread(target=self._tick, name=f"progress {desc}", daemon=True)
                self._thread.start()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.style == "lines" and self._due():
            self._line()

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Each item, counting one unit once the loop body is done with it; closes at the end (as tqdm does)."""
        finished = False
        try:
            for item in items:
                yield item
                self.update(1)
            finished = True
        finally:
            self.close(finished)

    def set_postfix(self, **values: object) -> None:
        """Extra fields shown after the count, e.g. loss=0.123."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self, finished: bool = True) -> None:
        """Stop; in "lines" style print a final line if this phase printed before (or a line is due anyway)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.style == "lines" and finished and (self.printed or self._due()):
            self._line(final=True)
        self.style = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(finished=kind is None)  # an interrupted or failed phase leaves the error line alone

    # ------------------------------------------------------------------ plain lines
    def _due(self) -> bool:
        return self.interval == 0 or time.perf_counter() - _last_line[0] >= self.interval

    def _tick(self) -> None:
        while True:
            wait = max(_last_line[0] + self.interval - time.perf_counter(), 0.01)
            if self._stop.wait(wait):
                return
            if self._due():
                self._line()

    def _line(self, final: bool = False) -> None:
        plural = self.unit if self.unit.endswith("s") else self.unit + "s"
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {plural}", f"{time.perf_counter() - self.start:.1f} s"]
        parts += [self.postfix] if self.postfix else []
        parts += ["done"] if final else []
        with _lock:
            print(", ".join(parts), file=self.stream, flush=True)
            _last_line[0] = time.perf_counter()
            self.printed = True
