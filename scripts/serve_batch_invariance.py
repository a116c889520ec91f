#!/usr/bin/env python
"""Whether `mk serve`'s answers move with what a text is batched with.

    python scripts/serve_batch_invariance.py --model tuned-int8 --data data

For each server setting (the default, and `--max-batch-size 1`): the first
--texts test texts are sent one at a time (each its own call), then a burst of
--burst one-text requests, --concurrency at once, which the batcher coalesces.
Prints, per setting, the largest difference of a burst answer's logits from the
same text's answer alone, the labels that flipped, and the burst's seconds. A
dynamically quantized int8 model takes its activations' scales over the whole
call, so its answers may move; an fp32 model's move by float rounding only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import cpu, launch  # noqa: E402 — a script beside this one


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the served model (e.g. the demo's int8)")
    p.add_argument("--data", required=True, help="dataset artifact whose test texts are sent")
    p.add_argument("--texts", type=int, default=64, help="distinct test texts")
    p.add_argument("--burst", type=int, default=640, help="one-text requests in the burst")
    p.add_argument("--concurrency", type=int, default=64)
    return p.parse_args()


async def answers(url: str, name: str, texts: list[str], concurrency: int) -> list[list[float]]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(session, text):
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}],
                "outputs": [{"name": "logits"}]}
        async with gate, session.post(f"{url}/v2/models/{name}/infer", data=json.dumps(body)) as r:
            out = await r.json()
            if r.status != 200:
                raise SystemExit(f"HTTP {r.status}: {out}")
            return out["outputs"][0]["data"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        return await asyncio.gather(*(one(s, t) for t in texts))


def main() -> None:
    a = parse()
    from mk.core.dataset import load_split, open_dataset
    from mk.core.measurement.http_bench import test_texts

    ds = open_dataset(a.data)
    texts = test_texts(ds, load_split(ds, "test"))[0][:a.texts]
    burst = [texts[i % len(texts)] for i in range(a.burst)]
    mk = str(Path(sys.executable).with_name("mk"))
    print(f"CPU: {cpu()}; {len(texts)} test texts alone, then {a.burst} one-text requests, {a.concurrency} at once")
    for setting in ([], ["--max-batch-size", "1"]):
        url, proc = launch([mk, "serve", a.model, "--port", "0", *setting])
        try:
            name = json.loads(urllib.request.urlopen(f"{url}/v2").read())["models"][0]
            alone = np.array(asyncio.run(answers(url, name, texts, 1)))
            t0 = time.perf_counter()
            together = np.array(asyncio.run(answers(url, name, burst, a.concurrency)))
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        ref = alone[[i % len(texts) for i in range(a.burst)]]
        flips = int((together.argmax(-1) != ref.argmax(-1)).sum())
        print(f"  {' '.join(setting) or 'default batching':22} max |logit difference| from alone "
              f"{np.abs(together - ref).max():.3g}, labels flipped {flips} of {a.burst}, burst {seconds:.2f} s")


if __name__ == "__main__":
    main()
