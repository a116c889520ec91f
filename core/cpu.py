"""The CPU mk runs on, and the int8 settings that are right for it.

ONNX Runtime's CPU kernels (MLAS) multiply uint8 activations by int8 weights.
With VNNI (AVX-512 VNNI, AVX-VNNI) or AMX the products are added straight into
32 bits. With AVX2 or AVX-512 alone they use `vpmaddubsw`, which adds two
neighbouring products into a 16-bit lane with saturation: 255 × 127 × 2 = 64770
does not fit, so full 8-bit weights can be clipped (ORT's quantization guide,
"When to use reduce-range"). 7-bit weights (`reduce_range`) bound every pair to
255 × 64 × 2 = 32640, which fits. Measured (README, "Quantization"): on an
AVX2-only AMD EPYC reduce-range costs no speed and agrees with fp32 more often;
on the tests' model, emulated AVX2 arithmetic changes 20-23 % of the default
int8 model's answers and none of the reduce-range model's (tests/test_quant.py).

ARM (NEON dot-product, i8mm) and the VNNI paths add in 32 bits: they keep the
full-range default. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# The flags that decide ONNX Runtime's int8 kernel, as /proc/cpuinfo names them.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SATURATING_FLAGS = ("avx2", "avx512bw")
ARM_DOT_FLAGS = ("asimddp", "i8mm")
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512bw", *VNNI_FLAGS, "avx512_bf16", "amx_bf16", "neon", "asimd",
                     *ARM_DOT_FLAGS)

VNNI = "vnni"           # u8×s8 summed in 32 bits: no saturation
SATURATING = "avx2"     # u8×s8 pairs summed in 16 bits (AVX2 / AVX-512 without VNNI)
ARM_DOT = "arm-dot"     # ARM dot-product instructions: 32-bit sums
OTHER = "other"         # no SIMD int8 path known to mk (plain C kernels: exact, slow)
PATHS = (VNNI, SATURATING, ARM_DOT, OTHER)


@dataclass(frozen=True)
class CPU:
    model: str
    flags: tuple[str, ...]   # only the ones in FLAGS_THAT_MATTER, in that order

    @property
    def int8_path(self) -> str:
        return int8_path(self.flags)

    def record(self) -> dict:
        """What goes into an artifact's mk.json."""
        return {"model": self.model, "flags": list(self.flags), "int8_path": self.int8_path}


def int8_path(flags) -> str:
    """Which int8 arithmetic ONNX Runtime uses on a CPU with these flags."""
    flags = set(flags)
    if flags & set(VNNI_FLAGS):
        return VNNI
    if flags & set(SATURATING_FLAGS):
        return SATURATING
    if flags & set(ARM_DOT_FLAGS):
        return ARM_DOT
    return OTHER


def int8_settings(flags, method: str) -> dict:
    """Weight type, reduce-range and per-channel for `method` on a CPU with `flags`.

    The VNNI default (full-range int8 weights per channel) everywhere the sums are
    32-bit; 7-bit weights where they are 16-bit pairs, keeping per channel (ORT:
    "on AVX2 and AVX-512 machines you will generally need reduce_range if per_channel
    is enabled"). fp16 has no int8 settings."""
    if method not in ("dynamic", "static"):
        return {}
    return {"weight_type": "int8", "per_channel": True, "reduce_range": int8_path(flags) == SATURATING}


def settings_note(flags, method: str) -> str | None:
    """A sentence for stderr when the settings chosen differ from the VNNI default."""
    chosen, default = int8_settings(flags, method), int8_settings(VNNI_FLAGS, method)
    if chosen == default:
        return None
    differs = ", ".join(f"{k} {chosen[k]}" for k in chosen if chosen[k] != default[k])
    return (f"this CPU has no VNNI (int8 products are summed in saturating 16-bit pairs): "
            f"{differs} instead of the VNNI default")


@functools.lru_cache(maxsize=1)
def this_cpu() -> CPU:
    """The CPU of this machine, read once: /proc/cpuinfo on Linux, else what the platform says."""
    model, flags = _from_proc_cpuinfo()
    if model is None:
        model, flags = _from_platform()
    return CPU(model=model or "unknown", flags=tuple(f for f in FLAGS_THAT_MATTER if f in flags))


def _from_proc_cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and model is None:  # x86; ARM boards
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86; ARM
                    flags = set(value.split())
    except OSError:
        return None, set()
    return model, flags


def _from_platform() -> tuple[str, set[str]]:
    """macOS and Windows: no /proc. Apple silicon has the ARM dot-product (ARMv8.4+);
    elsewhere the flags are unknown and the VNNI default stays."""
    machine = platform.machine().lower()
    model = platform.processor() or machine
    if platform.system() == "Darwin" and machine in ("arm64", "aarch64"):
        return model, {"asimd", "asimddp"}
    return model, set()


def int8_path_mismatch(art) -> str | None:
    """A warning when a quantized artifact was made (and its accuracy measured) on a CPU
    whose int8 arithmetic differs from this one's; None when it is the same or unknown."""
    record = art.manifest.get("quantization") or {}
    made_on = record.get("cpu") if record.get("method") in ("dynamic", "static") else None
    if not isinstance(made_on, dict) or made_on.get("int8_path") not in PATHS:
        return None
    here = this_cpu()
    if _sums(made_on["int8_path"]) == _sums(here.int8_path):
        return None
    return (f"{art.path}: quantized on {made_on.get('model', 'another CPU')} ({_describe(made_on['int8_path'])}); "
            f"this CPU ({here.model}) uses {_describe(here.int8_path)}, so its accuracy in mk.json "
            f"was measured on other arithmetic: re-run `mk quant` here, or check it with `mk bench --data`")


def warn_int8_path_mismatch(art) -> None:
    """Say on stderr (mk serve) what int8_path_mismatch finds."""
    from mk.core.console import log

    if note := int8_path_mismatch(art):
        log.warning("%s", note)


def _sums(path: str) -> str:
    """Two paths compute the same integers when both sum in 32 bits."""
    return "16-bit" if path == SATURATING else "32-bit"


def _describe(path: str) -> str:
    return ("int8 sums in saturating 16-bit pairs (no VNNI)" if path == SATURATING
            else "int8 sums in 32 bits (VNNI/AMX/ARM dot-product)")
