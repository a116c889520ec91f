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


def read_input(arg: Path | None, what: str = "input") -> Path:
    """The input path: the argument, else the one line piped on stdin (more than one
    path is ambiguous, exit 2). A JSON object on stdin (an upstream `--json`) gives
    its "path"."""
    if arg is not None:
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise BadInput(f"no {what} given", hint=f"pass the {what} path, or pipe it on stdin")
    text = sys.stdin.read().strip()
    if not text:
        raise BadInput(f"stdin was empty where the {what} path was expected",
                       hint="did the command before the pipe fail?")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"stdin: invalid JSON ({e.msg} at line {e.lineno}) where the {what} path was "
                           "expected", hint="did the command before the pipe stop half-way?") from None
        path = obj.get("path") if isinstance(obj, dict) else None
        if not isinstance(path, str) or not path.strip():
            raise BadInput(f"stdin: JSON without a \"path\" string where the {what} path was expected")
        return Path(path)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise BadInput(f"stdin: {len(lines)} lines where one {what} path was expected",
                       hint="this command reads one input: pipe one path, or pass it as an argument")
    return Path(lines[0])
