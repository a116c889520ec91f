"""The CPU's int8 path, the quantization settings chosen for it, and the warning when a
quantized model meets a CPU of the other kind."""

from __future__ import annotations

import pytest

from mk.core import cpu
from mk.core.artifact import Artifact

# Real flag lines (trimmed to what matters) of the CPUs mk is run on.
XEON_SAPPHIRE_RAPIDS = "avx avx2 avx512f avx512bw avx_vnni avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
XEON_CASCADE_LAKE = "avx avx2 avx512f avx512bw avx512_vnni"
XEON_SKYLAKE_SP = "avx avx2 avx512f avx512bw"           # AVX-512 without VNNI: vpmaddubsw too
EPYC_ZEN3 = "avx avx2 fma"                              # the AVX2-only CPU of the issue
ALDER_LAKE = "avx avx2 avx_vnni"                         # AVX-VNNI without AVX-512
EPYC_ZEN4 = "avx avx2 avx512f avx512bw avx512_vnni avx512_bf16"
GRAVITON3 = "fp asimd asimddp i8mm"
OLD_X86 = "sse sse2 sse4_1"


@pytest.mark.parametrize("flags, path, reduce_range", [
    (XEON_SAPPHIRE_RAPIDS, cpu.VNNI, False),
    (XEON_CASCADE_LAKE, cpu.VNNI, False),
    (ALDER_LAKE, cpu.VNNI, False),
    (EPYC_ZEN4, cpu.VNNI, False),
    (XEON_SKYLAKE_SP, cpu.SATURATING, True),
    (EPYC_ZEN3, cpu.SATURATING, True),
    (GRAVITON3, cpu.ARM_DOT, False),
    (OLD_X86, cpu.OTHER, False),
    ("", cpu.OTHER, False),
])
def test_each_flag_set_gets_its_int8_path_and_settings(flags, path, reduce_range):
    flags = flags.split()
    assert cpu.int8_path(flags) == path
    for method in ("dynamic", "static"):
        assert cpu.int8_settings(flags, method) == {"weight_type": "int8", "per_channel": True,
                                                    "reduce_range": reduce_range}
    assert cpu.int8_settings(flags, "fp16") == {}
    note = cpu.settings_note(flags, "dynamic")
    assert (note is not None) == reduce_range
    if note:
        assert "reduce_range True" in note and "VNNI" in note


def test_this_cpu_reads_the_machine_once_and_keeps_only_the_flags_that_matter():
    here = cpu.this_cpu()
    assert here is cpu.this_cpu()
    assert here.model and set(here.flags) <= set(cpu.FLAGS_THAT_MATTER)
    assert here.record() == {"model": here.model, "flags": list(here.flags), "int8_path": here.int8_path}


def _quantized(tmp_path, int8_path: str | None, method: str = "dynamic") -> Artifact:
    record = {"method": method}
    if int8_path:
        record["cpu"] = {"model": "Some CPU", "flags": [], "int8_path": int8_path}
    return Artifact(tmp_path, {"kind": "model", "format": "onnx", "quantization": record})


def test_a_model_quantized_on_the_other_kind_of_cpu_is_flagged(tmp_path, monkeypatch):
    for here_flags, same, other in ((EPYC_ZEN3, cpu.SATURATING, cpu.VNNI),
                                    (XEON_SAPPHIRE_RAPIDS, cpu.VNNI, cpu.SATURATING)):
        monkeypatch.setattr(cpu, "this_cpu", lambda f=here_flags: cpu.CPU("Here CPU", tuple(f.split())))
        assert cpu.int8_path_mismatch(_quantized(tmp_path, same)) is None
        note = cpu.int8_path_mismatch(_quantized(tmp_path, other))
        assert note and "Some CPU" in note and "Here CPU" in note and "mk quant" in note
        # ARM dot-product sums in 32 bits, like VNNI: the same integers
        assert (cpu.int8_path_mismatch(_quantized(tmp_path, cpu.ARM_DOT)) is None) == (same == cpu.VNNI)
        # fp16, unquantized and older artifacts (no CPU recorded) say nothing
        assert cpu.int8_path_mismatch(_quantized(tmp_path, other, method="fp16")) is None
        assert cpu.int8_path_mismatch(_quantized(tmp_path, None)) is None
        assert cpu.int8_path_mismatch(Artifact(tmp_path, {"kind": "model", "format": "onnx"})) is None


def test_bench_and_serve_warn_on_a_model_quantized_on_the_other_kind_of_cpu(tmp_path, tiny_model, tiny_dataset):
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import run_mk
    from mk.core.compression.export import export_onnx
    from mk.core.compression.quantize import quantize

    export_onnx(tiny_model, tmp_path / "onnx", data=tiny_dataset)
    int8 = tmp_path / "int8"
    quantize(tmp_path / "onnx", int8, gate=False)
    manifest = json.loads((int8 / "mk.json").read_text())
    made_here = manifest["quantization"]["cpu"]
    assert made_here == cpu.this_cpu().record()
    args = ["--threads", "1", "--iters", "2", "--rounds", "1", "--warmup", "1", "--batch-sizes", "1",
            "--seq-lens", "16", "--json"]
    assert "quantized on" not in run_mk("bench", str(int8), *args, check=True).stderr

    other = cpu.VNNI if made_here["int8_path"] == cpu.SATURATING else cpu.SATURATING
    manifest["quantization"]["cpu"] = {**made_here, "model": "Another CPU", "int8_path": other}
    (int8 / "mk.json").write_text(json.dumps(manifest))
    r = run_mk("bench", str(int8), *args, check=True)
    assert "quantized on Another CPU" in r.stderr
    assert any("quantized on Another CPU" in w for w in json.loads(r.stdout)["warnings"])

    proc = subprocess.Popen([str(Path(sys.executable).with_name("mk")), "serve", str(int8), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "quantized on Another CPU" in err


def test_mk_quant_fills_only_the_choices_left_open_and_says_when_it_departs_from_vnni(monkeypatch):
    import logging

    from mk.core.compression import quantize as q
    from mk.core.console import log

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        for flags, reduce_range in ((EPYC_ZEN3, True), (XEON_SAPPHIRE_RAPIDS, False)):
            monkeypatch.setattr(q, "this_cpu", lambda f=flags: cpu.CPU("Some CPU", tuple(f.split())))
            said.clear()
            s = q.QuantSettings(method="static")
            record = q.settings_for_this_cpu(s)
            assert (s.per_channel, s.reduce_range) == (True, reduce_range)
            assert record["given"] == {} and record["chosen_for_cpu"]["reduce_range"] is reduce_range
            assert record["cpu"]["model"] == "Some CPU"
            assert any("no VNNI" in m for m in said) == reduce_range
            # an explicit flag wins, is recorded as given, and leaves nothing to say
            said.clear()
            s = q.QuantSettings(method="dynamic", reduce_range=not reduce_range, per_channel=False)
            record = q.settings_for_this_cpu(s)
            assert (s.per_channel, s.reduce_range) == (False, not reduce_range) and not said
            assert record["given"] == {"per_channel": False, "reduce_range": not reduce_range}
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
