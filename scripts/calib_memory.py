"""Peak memory of static calibration: every row in one collect_data call (ONNX
Runtime's default) against one batch per call (what `mk quant` does).

    python scripts/calib_memory.py ONNX_MODEL_DIR DATASET_DIR --rows 256 --method percentile

Each mode runs in a fresh process (peak RSS is per process), interleaved, and the
CPU is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def calibrate(onnx_dir: str, dataset: str, rows: int, method: str, per_batch: bool) -> dict:
    from mk.core.artifact import open_artifact
    from mk.core.compression.quantize import DatasetCalibrationReader, QuantSettings, quantize_file
    from mk.core.dataset import load_split

    class OneCall(DatasetCalibrationReader):
        """Every batch in a single collect_data call: ONNX Runtime's behaviour without the stride."""

        def __len__(self):
            return 1

        def set_range(self, start_index, end_index):
            self.rewind()

    art = open_artifact(onnx_dir)
    split = load_split(open_artifact(dataset), "train", limit=rows)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    reader = (DatasetCalibrationReader if per_batch else OneCall)(split, names, rows, 16)
    settings = QuantSettings(method="static", calib_method=method, calib_size=reader.rows)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_file(art.path / "model.onnx", Path(tmp) / "model.onnx", settings, art.config(), reader, Path(tmp))
    return {"rows": reader.rows, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx_dir")
    ap.add_argument("dataset")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", choices=["all", "batch"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(calibrate(args.onnx_dir, args.dataset, args.rows, args.method, args.child == "batch")))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8")
             if f in Path("/proc/cpuinfo").read_text().split()]
    print(f"cpu: {cpu} ({', '.join(flags)}); {args.method}, {args.rows} rows asked", file=sys.stderr)
    for _ in range(args.repeats):
        for mode in ("all", "batch"):
            out = subprocess.run([sys.executable, __file__, args.onnx_dir, args.dataset, "--rows", str(args.rows),
                                  "--method", args.method, "--child", mode], capture_output=True, text=True)
            result = json.loads(out.stdout) if out.returncode == 0 else {"failed": out.stderr.strip()[-300:]}
            print(json.dumps({"mode": "one call" if mode == "all" else "a batch per call", **result}))


if __name__ == "__main__":
    main()
