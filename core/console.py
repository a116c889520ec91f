"""Where mk talks to people: stderr only, quiet or verbose, progress only on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console

# rich honours NO_COLOR by itself; stderr keeps stdout free for results. Off a
# terminal (CI logs, files) rich would wrap at 80 columns and cut table cells;
# logs are wider than that, so COLUMNS or 160 there.
console = Console(stderr=True, highlight=False,
                  width=None if sys.stderr.isatty() else int(os.environ.get("COLUMNS") or 160))
log = logging.getLogger("mk")
_state = {"verbosity": 0}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set up logging on stderr: -q shows warnings only, -v shows debug lines."""
    from rich.logging import RichHandler

    _state["verbosity"] = -1 if quiet else (1 if verbose else 0)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    if sys.stderr.isatty():
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    else:
        # rich pads and wraps every log line to the console's width: a long path would break one
        # line in two for grep and CI logs. Off a terminal a log line is one plain line.
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it), as the
    console does."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def quiet_onnxruntime() -> int:
    """ONNX Runtime logs from C++ straight to stderr, in colour whatever NO_COLOR says,
    and its lines cannot be routed through mk's console: they show only with -v. Its
    errors still reach the user, as the exceptions mk reports as `error: …`."""
    import onnxruntime

    severity = 2 if _state["verbosity"] > 0 else 4
    onnxruntime.set_default_logger_severity(severity)
    return severity


def quiet() -> bool:
    return _state["verbosity"] < 0


def interactive() -> bool:
    """Progress bars only when a person watches stderr."""
    return sys.stderr.isatty() and not quiet()


class _Progress:
    """Advances a rich bar on a terminal; elsewhere logs a line every ~10 s."""

    def __init__(self, description: str, total: int | None, bar):
        self.description, self.total, self.bar = description, total, bar
        self.done = 0
        self._task = bar.add_task(description, total=total, info="") if bar else None
        self._last_log = time.monotonic()

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self._task, advance=n, info=info)
        elif time.monotonic() - self._last_log > 10 and not quiet():
            self._last_log = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s %s", self.description, self.done, of, info)


@contextmanager
def progress(description: str, total: int | None = None):
    """`with progress("training", total=n) as p: p.advance(1, info="loss 0.3")`."""
    if not interactive():
        yield _Progress(description, total, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=True) as bar:
        yield _Progress(description, total, bar)
