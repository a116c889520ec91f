"""The integer arithmetic of ONNX Runtime's u8×s8 GEMMs on CPUs without VNNI, in numpy.

On AVX2 and AVX-512 without VNNI, MLAS multiplies uint8 activations by int8
weights with `vpmaddubsw`, which adds the products of two neighbouring k
(k = 2j, 2j + 1) into a 16-bit lane with signed saturation, and only then
widens to 32 bits (`vpmaddwd` by ones): see MlasGemmU8S8KernelAvx2 in
onnxruntime/core/mlas/lib/x86_64/QgemmU8S8KernelAvx2.S. A VNNI `vpdpbusd`
(and AMX) adds four products straight into 32 bits and never saturates. The
zero-point corrections (row and column sums) are exact on both.

This runs a quantized model through ONNX's reference evaluator with
MatMulInteger replaced by that arithmetic, so a machine with VNNI can see what
the same model computes on one without. A static (QDQ) model is first rewritten
so that each MatMul between two DequantizeLinear outputs is the MatMulInteger
ONNX Runtime fuses it into (the integer GEMM on the quantized tensors, then the
product of the scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

I16_MIN, I16_MAX = -32768, 32767


@dataclass
class Saturation:
    """What the 16-bit pair sums did over one run: pairs computed and pairs clipped."""

    pairs: int = 0
    clipped: int = 0
    per_node: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.clipped / max(self.pairs, 1)


def pair_sums_dot(a: np.ndarray, b: np.ndarray, saturate: bool) -> tuple[np.ndarray, int]:
    """Σ_j sat16(a[:, 2j]·b[2j] + a[:, 2j+1]·b[2j+1]) for raw uint8 `a` [M, K] and
    int8 `b` [K, N]; returns the int32 result and how many pair sums were clipped.

    The exact product comes from one float64 GEMM (exact: |sums| < 2^53); then only the
    rows of a pair whose bound |a|·max|b| can pass 32767 are expanded and corrected."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    out = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    if not saturate:
        return out.astype(np.int32), 0
    if a.shape[1] % 2:  # MLAS pads K with zeros
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    top = np.abs(b).max(axis=1)
    clipped = 0
    for k in range(0, a.shape[1], 2):
        rows = np.nonzero(a[:, k] * top[k] + a[:, k + 1] * top[k + 1] > I16_MAX)[0]
        if rows.size == 0:
            continue
        pair = np.outer(a[rows, k], b[k]) + np.outer(a[rows, k + 1], b[k + 1])
        excess = pair - np.clip(pair, I16_MIN, I16_MAX)
        clipped += int(np.count_nonzero(excess))
        out[rows] -= excess
    return out.astype(np.int32), clipped


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None, saturate: bool = True):
    """MatMulInteger as MLAS computes it: the raw u8×s8 GEMM (16-bit pair sums when
    `saturate`), then the exact zero-point corrections."""
    za = np.int32(0 if a_zero_point is None else np.asarray(a_zero_point).astype(np.int32).reshape(()))
    zb = np.broadcast_to(np.int32(0) if b_zero_point is None else np.asarray(b_zero_point).astype(np.int32).reshape(-1),
                         (b.shape[-1],))
    flat = a.reshape(-1, a.shape[-1])
    raw, clipped = pair_sums_dot(flat, b, saturate)
    k = a.shape[-1]
    raw = (raw - za * b.astype(np.int32).sum(axis=0)[None, :]
           - flat.astype(np.int32).sum(axis=1)[:, None] * zb[None, :] + k * za * zb[None, :])
    return raw.reshape(*a.shape[:-1], b.shape[-1]).astype(np.int32), clipped, flat.shape[0] * ((k + 1) // 2) * b.shape[-1]


def as_integer_graph(model):
    """A copy of `model` where every MatMul fed by two DequantizeLinear nodes (static QDQ)
    is MatMulInteger on the quantized tensors times the product of their scales."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for opset in model.opset_import:  # the reference evaluator implements DequantizeLinear from 19 on
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = []
    for n in model.graph.node:
        dqs = [producer.get(i) for i in n.input]
        if n.op_type != "MatMul" or not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
            nodes.append(n)
            continue
        (qa, sa, za), (qw, sw, zw) = ([*d.input, ""][:3] for d in dqs)
        y = n.output[0]
        nodes += [helper.make_node("MatMulInteger", [qa, qw, za, zw], [f"{y}/int32"]),
                  helper.make_node("Cast", [f"{y}/int32"], [f"{y}/float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [sa, sw], [f"{y}/scale"]),
                  helper.make_node("Mul", [f"{y}/float", f"{y}/scale"], [y])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def run(model, feeds: list[dict], saturate: bool) -> tuple[np.ndarray, Saturation]:
    """Logits of `model` (an int8 ONNX model) on each feed, every integer GEMM computed
    with 16-bit pair sums (`saturate`, a CPU without VNNI) or exactly (VNNI, AMX)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    stats = Saturation()

    class MatMulInteger(OpRun):
        op_domain = ""

        def _run(self, A, B, a_zero_point=None, b_zero_point=None):
            if B.dtype != np.int8:  # u8×u8 (static attention): MLAS widens to 16 bits first, exact everywhere
                a = A.astype(np.int32) - (0 if a_zero_point is None else a_zero_point.astype(np.int32))
                b = B.astype(np.int32) - (0 if b_zero_point is None else b_zero_point.astype(np.int32))
                return (a @ b,)
            out, clipped, pairs = matmul_integer(A, B, a_zero_point, b_zero_point, saturate)
            stats.pairs += pairs
            stats.clipped += clipped
            name = self.onnx_node.output[0]
            stats.per_node[name] = stats.per_node.get(name, 0) + clipped
            return (out,)

    graph = as_integer_graph(model)
    session = ReferenceEvaluator(graph, new_ops=[MatMulInteger])
    names = {i.name for i in graph.graph.input}
    logits = [session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]
    return np.concatenate(logits), stats
