"""Read a safetensors header without torch: tensor names, shapes, parameter count.

The format is an 8-byte little-endian header length, a JSON header, then the
data; checking that the header's offsets end exactly at the file's end catches
truncated files before anything tries to load them.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from mk.core.errors import BadInput

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInput(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise BadInput(f"{path}: truncated or not a safetensors file (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: corrupt safetensors header ({e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise BadInput(f"{path}: truncated safetensors file: its header describes {8 + n + end} bytes, "
                       f"the file has {size}")
    return tensors


def parameter_count(path: Path) -> int:
    return sum(math.prod(t["shape"]) for t in read_header(path).values())
