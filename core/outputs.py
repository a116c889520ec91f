"""Putting an output in place without destroying what mk did not make.

A command writes into a hidden temporary sibling, `.NAME.tmp-PID`, and puts it
at `-o NAME` only when it ends cleanly. What may stand at NAME then:

- nothing, as at the start: the rename must not replace anything that appeared
  meanwhile (another run, a folder made by hand). On Linux renameat2 with
  RENAME_NOREPLACE makes that one atomic step; elsewhere a lock file beside the
  output serializes mk's own writers and the state is re-checked under it.
- with `--force`, an mk artifact (a folder whose valid mk.json lists every file
  it holds) or an empty folder, and for file outputs a regular file the command
  recognises as its own. It is swapped out atomically (RENAME_EXCHANGE) and
  deleted only if what was swapped out is still the very thing checked at the
  start; otherwise it is swapped back and the run ends with exit 2.

Anything else (a folder of other files, a file, a FIFO, a device, a symbolic
link) is refused, with or without `--force`, naming what is there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import shutil
import signal
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from mk.core.artifact import MANIFEST, read_manifest
from mk.core.console import log
from mk.core.errors import BadInput

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100

# Why what stands at a path may not be replaced (None: it may be).
Blocker = Callable[[Path], "str | None"]


# ------------------------------------------------------------ renameat2 --

@functools.cache
def _renameat2():
    """libc's renameat2 (Linux, glibc ≥ 2.28 or musl ≥ 1.2.4), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """Rename with renameat2 flags; False where the OS or file system lacks them
    (the caller then takes the portable path); OSError for a real failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


# ---------------------------------------------------- what stands there --

def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def describe(path: Path) -> str | None:
    """What stands at `path` in words (a symbolic link is not followed), or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def artifact_blocker(path: Path) -> str | None:
    """Why `--force` may not replace what is at `path`: None for an empty folder
    or an mk artifact (a valid mk.json that lists every other file the folder holds)."""
    what = describe(path)
    if what != "a folder":
        return what
    names = os.listdir(path)
    if not names:
        return None
    if MANIFEST not in names:
        return "a folder that is not an mk artifact (no mk.json)"
    try:
        manifest = read_manifest(path)
    except BadInput as e:
        return f"a folder whose mk.json is not valid ({e.message})"
    listed = {e["name"] for e in manifest["files"] or []}
    extra = sorted(name for name in _files_under(path) if name != MANIFEST and name not in listed)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"an mk artifact holding files that mk did not write ({shown})"
    return None


def _files_under(root: Path) -> list[str]:
    """Every non-folder under `root`, relative, without following symbolic links."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files]
        found += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(folder, d))]
    return found


def file_blocker(ours: Blocker | None = None) -> Blocker:
    """For file outputs: only a regular file that `ours` (if given) accepts."""

    def blocker(path: Path) -> str | None:
        what = describe(path)
        if what != "a file":
            return what
        return ours(path) if ours is not None else None

    return blocker


# --------------------------------------------------------- the checks --

def check_apart(out: Path, inputs, flag: str = "-o") -> None:
    """Refuse an output that is an input or holds one (--force would delete it), one
    inside an input (it would change the input: a source folder of classes would gain
    one), and one inside any mk artifact (its mk.json lists every file it holds, so the
    artifact would no longer verify). `inputs` that do not exist are skipped: some are
    names (`minilm`), not paths."""
    target = Path(out).resolve()
    for ref in inputs:
        if ref is None or not Path(ref).exists():
            continue
        source = Path(ref).resolve()
        if source.is_relative_to(target):
            raise BadInput(f"{flag} {out}: would overwrite the input {ref}", hint=f"choose another {flag}")
        if target.is_relative_to(source):
            raise BadInput(f"{flag} {out}: inside the input {ref}", hint=f"choose another {flag}, outside it")
    for folder in target.parents:
        if _is_artifact(folder):
            raise BadInput(f"{flag} {out}: inside the mk artifact {folder} (its mk.json lists every file it holds)",
                           hint=f"choose another {flag}, outside it")


def _is_artifact(folder: Path) -> bool:
    """A folder with a valid mk manifest (an `mk.json` of another tool's is not one)."""
    if not (folder / MANIFEST).is_file():
        return False
    try:
        read_manifest(folder)
    except BadInput:
        return False
    return True


def check_output(out: Path, force: bool, inputs=(), blocker: Blocker = artifact_blocker, flag: str = "-o") -> Path:
    """Refuse, before any work, an output that cannot or must not be written: one that
    exists (unless --force, and then only what `blocker` allows), one below a file
    or in a folder that is not writable, and one that is an input, holds one or lies
    inside one. Missing parent folders are fine: `atomic_output` makes them."""
    out = Path(out)
    check_apart(out, inputs, flag)
    what = describe(out)
    if what is not None:
        why = blocker(out)
        if not force:
            raise BadInput(f"{out}: already exists ({why or what})",
                           hint=f"pass --force to replace it, or choose another {flag}" if why is None else
                           f"--force would not replace it either (only what mk wrote); choose another {flag}")
        if why is not None:
            raise BadInput(f"{out}: is {why}; --force replaces only what mk wrote there (an mk artifact, "
                           "an empty folder)" if describe(out) == "a folder" else
                           f"{out}: is {why}; --force does not replace it",
                           hint=f"move it away, or choose another {flag}")
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"{ancestor}: the output's parent is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInput(f"{ancestor}: the output's parent folder is not writable")
    return out


def _make_parents(out: Path) -> list[Path]:
    """`mkdir -p` of the output's parent; the folders made, deepest last."""
    missing = []
    parent = out.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours to remove
            continue
        made.append(folder)
    return made


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove `.NAME.tmp-PID` left by runs that were killed (kill -9, out of memory);
    refuse while another live process is writing the same output."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            raise BadInput(f"{out}: another process (pid {pid}) is writing it now, into {tmp.name}",
                           hint=f"wait for it, or choose another -o (if no mk is running, remove {tmp})")
        _remove(tmp)
        log.warning("removed %s, left by an earlier run (process %s) that did not finish", tmp, pid)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


# ---------------------------------------------------------- the swap --

def _raced(out: Path) -> BadInput:
    return BadInput(f"{out}: changed while this run was writing it (now {describe(out) or 'gone'}); "
                    "it was left as it is and this run's result discarded",
                    hint="another run writing the same -o? choose another -o")


def _place(tmp: Path, out: Path, before: tuple | None, blocker: Blocker) -> None:
    """Put `tmp` at `out` if `out` is still what was checked at the start (`before`:
    its identity, None for nothing); whatever gets replaced is left in `tmp`."""
    try:
        if before is None and _rename2(tmp, out, RENAME_NOREPLACE):
            return
        if before is not None and _rename2(tmp, out, RENAME_EXCHANGE):
            if _identity(tmp) != before or blocker(tmp) is not None:
                _rename2(tmp, out, RENAME_EXCHANGE)  # not what was checked: put it back
                raise _raced(out)
            return
    except FileExistsError:
        raise _raced(out) from None
    except FileNotFoundError:  # what was checked is gone: nothing to replace any more
        if before is None:
            raise
        return _place(tmp, out, None, blocker)
    with _lock(out):
        _place_portably(tmp, out, before, blocker)


def _place_portably(tmp: Path, out: Path, before: tuple | None, blocker: Blocker) -> None:
    """Without renameat2: re-check under the lock, then rename. Only mk's writers
    take the lock, so a folder made by hand in the instant between the check and
    the rename could still be lost, and then only an empty one (rename(2) never
    replaces a folder that holds files)."""
    if _identity(out) != before or (before is not None and blocker(out) is not None):
        raise _raced(out)
    if before is None:
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    os.rename(old, tmp)  # the caller removes tmp


@contextmanager
def _lock(out: Path):
    lock = out.parent / f".{out.name}.lock"
    for attempt in (1, 2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = lock.read_text().strip() if lock.is_file() else ""
            if attempt == 2 or (pid.isdigit() and _alive(int(pid))):
                raise BadInput(f"{out}: another process (pid {pid or '?'}) is putting it in place now",
                               hint=f"choose another -o (if no mk is running, remove {lock})") from None
            lock.unlink(missing_ok=True)  # left by a process that is gone
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


# ----------------------------------------------------------- the writers --

class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` and `with` block cleans up."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextmanager
def terminate_as_interrupt():
    """Within the block SIGTERM unwinds the stack like SIGINT does (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _atomic(out: Path, force: bool, blocker: Blocker, make: Callable[[Path], None]):
    out = check_output(Path(out), force, blocker=blocker)
    made, tmp, done = [], None, False
    try:
        with terminate_as_interrupt():
            made = _make_parents(out)
            _clean_stale(out)
            before = _identity(out)
            if before is not None and not force:  # appeared since the check
                raise _raced(out)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            make(tmp)
            yield tmp
            _place(tmp, out, before, blocker)
            done = True
    finally:
        if tmp is not None:
            _remove(tmp)
        if not done:
            for folder in reversed(made):  # the parents this run made, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def atomic_output(out: str | Path, force: bool = False, blocker: Blocker = artifact_blocker):
    """Yield a temporary sibling folder; put it at `out` only when the block ends
    cleanly (see the module's docstring for what --force may replace). On an
    exception, SIGINT or SIGTERM the temporary folder, and the parent folders this
    run made, are removed and what stood at `out` is left as it was."""
    return _atomic(Path(out), force, blocker, lambda tmp: tmp.mkdir())


def atomic_file(out: str | Path, force: bool = False, ours: Blocker | None = None):
    """`atomic_output` for a single file: yields a temporary sibling file name.
    `--force` replaces only a regular file that `ours` accepts."""
    return _atomic(Path(out), force, file_blocker(ours), lambda tmp: None)
