"""`train_log.jsonl`: one JSON object a line for each event of a `mk tune` run
(start or resume, step, eval, test, end), kept in `OUT.ckpt/` and copied into
the output. A checkpoint records how far the log had been written, so that a
resumed run cuts what came after it and the log has no gaps or repeats."""

from __future__ import annotations

import json
from pathlib import Path

LOG_NAME = "train_log.jsonl"


class TrainLog:
    """The log in `folder`, cut at `offset`. Only rank 0 writes (`write=True`);
    elsewhere every call is a no-op."""

    def __init__(self, folder: Path, offset: int, write: bool):
        self.path = Path(folder) / LOG_NAME
        self._file = None
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+b")
            self._file.truncate(offset)
            self._file.seek(offset)

    def write(self, event: str, **fields) -> None:
        if self._file is not None:
            self._file.write((json.dumps({"event": event, **fields}, default=float) + "\n").encode())

    def flush(self) -> int:
        """Flush to the file; the offset reached (0 where this rank does not write)."""
        if self._file is None:
            return 0
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
