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
    """The input path: the argument, else the first line piped on stdin. A JSON
    object on stdin (an upstream `--json`) gives its "path"."""
    if arg is not None:
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise BadInput(f"no {what} given", hint=f"pass the {what} path, or pipe it on stdin")
    text = sys.stdin.read().strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["path"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadInput(f"stdin: JSON without a \"path\" where the {what} path was expected") from None
    lines = text.splitlines()
    if not lines:
        raise BadInput(f"stdin was empty where the {what} path was expected",
                       hint="did the command before the pipe fail?")
    return Path(lines[-1].strip())
