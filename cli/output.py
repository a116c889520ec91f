"""stdout is data: an artifact's path alone, or a JSON object with --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mk.core.errors import BadInput


def emit(path: Path | None, result: dict | None = None, as_json: bool = False) -> None:
    """Print the command's result on stdout: the path, or the JSON object."""
    if as_json:
        payload = dict(result or {})
        if path is not None:
            payload.setdefault("path", str(path))
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    elif path is not None:
        sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def show(path: Path | None, result: dict, as_json: bool = False, human=None) -> None:
    """The one way a command ends: `human(result)` draws its summary on stderr (not
    with -q), then stdout gets the result: the path alone, or the JSON object."""
    from mk.core.console import quiet

    if human is not None and not quiet():
        human(result)
    emit(path, result, as_json)


def warn(text: str, console=None) -> None:
    """A `warning:` line on stderr (shown with -q too)."""
    if console is None:
        from mk.core.console import console
    console.print(f"[bold yellow]warning:[/] {text}", markup=True, highlight=False, soft_wrap=True)


def read_input(arg: Path | None, what: str = "input") -> Path:
    """The input path: the argument, else the one path piped on stdin (more than one
    is ambiguous, exit 2)."""
    if arg is not None:
        return arg
    paths = read_piped(f"{what} path")
    if len(paths) > 1:
        raise BadInput(f"stdin: {len(paths)} lines where one {what} path was expected",
                       hint="this command reads one input: pipe one path, or pass it as an argument")
    return Path(paths[0])


def read_piped(what: str, hint: str | None = None) -> list[str]:
    """The paths piped on stdin: one per line, or upstream `--json` objects (one per
    line or pretty-printed) each giving its "path"; at least one."""
    if sys.stdin is None or sys.stdin.isatty():
        raise BadInput(f"no {what} given", hint=hint or f"pass the {what}, or pipe it on stdin")
    text = sys.stdin.read().strip()
    if not text:
        raise BadInput(f"stdin was empty where the {what} was expected", hint="did the command before the pipe fail?")
    paths, decoder, i = [], json.JSONDecoder(), 0
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "{":
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise BadInput(f"stdin: invalid JSON ({e.msg} at line {e.lineno}) where the {what} was expected",
                               hint="did the command before the pipe stop half-way?") from None
            path = obj.get("path")
            if not isinstance(path, str) or not path.strip():
                raise BadInput(f"stdin: JSON without a \"path\" string where the {what} was expected")
            paths.append(path)
        else:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            paths.append(text[i:end].strip())
            i = end
    return paths
