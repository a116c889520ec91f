"""`mk doctor`: what this machine can do for mk, and what to install for the rest."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import emit


@command("doctor")
def doctor(
    require: Annotated[Optional[str], typer.Option(
        "--require", help="Comma-separated pieces that must be present (torch, cuda, onnxruntime, "
                          "onnxruntime-cuda, tensorrt, tritonclient, avx2, avx512, vnni, amx); exit 1 "
                          "naming those missing.")] = None,
    as_json: options.Json = False,
):
    """Check this machine: CPU and its int8 flags, torch and CUDA, GPUs and driver,
    ONNX Runtime and its providers, TensorRT, which commands and --device choices
    will work, and the command that installs each missing piece.

    Each library is imported in a subprocess of its own, so a broken install is
    reported rather than fatal. Exit 0, unless --require names a missing piece (1).
    """
    from mk.core.doctor import INSTALL, diagnose, missing, required
    from mk.core.errors import MkError

    names = required(require)
    report = diagnose()
    lacking = missing(report, names)
    if as_json:
        emit(None, {**report, "required_missing": lacking}, as_json=True)
    else:
        _print(report)
    if lacking:
        raise MkError(f"missing: {', '.join(lacking)}",
                      hint="; ".join(f"{n}: {INSTALL[n]}" for n in lacking if n in INSTALL) or
                      "this CPU lacks the instruction set; use a machine that has it")


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    out = Console(highlight=False, soft_wrap=True)  # stdout: this report is the result
    cpu = r["cpu"]
    out.print(f"[bold]cpu[/]      {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or 'none'}"
              f" (int8 path: {cpu['int8_path']})")
    for name, lib in r["libraries"].items():
        if lib["ok"]:
            detail = {k: v for k, v in lib.items() if k not in ("ok", "version", "gpus")}
            extra = escape(", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}"
                                     for k, v in detail.items()))
            out.print(f"[bold]{name:<12}[/] {lib['version']}" + (f" ({extra})" if extra else ""))
            for g in lib.get("gpus", []):
                out.print(f"  gpu {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
                          f"{g['memory_bytes'] / 2**30:.0f} GiB")
        else:
            out.print(f"[bold]{name:<12}[/] [red]not usable[/]: {escape(lib['error'])}")
    smi = r["driver"]
    out.print("[bold]driver[/]   " + (", ".join(f"{g['name']} (driver {g['driver']})" for g in smi["gpus"])
                                      if smi["ok"] else f"[red]none[/]: {escape(str(smi['error']))}"))
    out.print("\n[bold]works here[/]")
    for what, ok in r["works"].items():
        out.print(f"  {'[green]yes[/]' if ok else '[red]no[/] '}  {what}")
    if r["missing"]:
        out.print("\n[bold]to install[/]")
        for name, how in r["missing"].items():
            out.print(f"  {name}: {escape(how)}")
