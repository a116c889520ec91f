"""`mk info`: what an artifact is, what it holds, and where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import emit, read_input
from mk.core.errors import BadInput


@command("info")
def info(
    path: Annotated[Optional[Path], options.input_argument("Artifact folder, model folder or `minilm`.")] = None,
    lineage: Annotated[bool, typer.Option("--lineage", help="Walk `parent` links back to the source.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's sha256.")] = False,
    as_json: options.Json = False,
):
    """Show an artifact's kind, format, labels, files, parameters, metrics and lineage.

    Reads only the manifest and file headers: fast, and it never imports torch.
    Exits 2 when a listed file is missing or differs from the manifest, or the folder holds a file
    the manifest does not list (`--force` would not replace such a folder either).
    """
    from mk.core.info import describe

    result = describe(read_input(path, "artifact"), lineage=lineage, verify=verify)
    if as_json:
        emit(None, result, as_json=True)
    else:
        _print(result)
    if result["problems"]:
        raise BadInput(f"{result['path']}: " + "; ".join(result["problems"]))


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from mk.core.artifact import human_bytes

    out = Console(highlight=False, soft_wrap=True)  # stdout: this table is the result
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("path", r["path"])
    fmt = f"{r['pickled_weights'][0]}, pickled" if r.get("pickled_weights") else r["format"]
    t.add_row("kind", f"{r['kind']} ({fmt})" + ("" if r["has_manifest"] else ", plain Hugging Face folder"))
    if r["task"]:
        t.add_row("task", r["task"])
    if r["labels"]:
        t.add_row("labels", ", ".join(map(str, r["labels"])))
    if r["parameters"] is not None:
        t.add_row("parameters", f"{r['parameters']:,}")
    t.add_row("size", f"{human_bytes(r['bytes'])} in {len(r['files'])} files")
    for name in ("splits", "max_length", "truncation_rate"):
        if name in r:
            t.add_row(name.replace("_", " "), _short(r[name]))
    if r["metrics"]:
        t.add_row("metrics", _short(r["metrics"]))
    if r["created_by"] and r["created_by"].get("command"):
        cb = r["created_by"]
        t.add_row("created by", f"{cb['command']}  (mk {cb.get('mk_version')}, {cb.get('time')})")
    for key in ("parent", "dataset"):
        if r[key]:
            t.add_row(key, r[key]["path"])
    out.print(t)
    if "lineage" in r:
        out.print("\n[bold]lineage[/] (newest first)")
        for i, step in enumerate(r["lineage"]):
            flag = " [red](missing)[/]" if step["missing"] else " [yellow](changed since)[/]" if step["changed"] else ""
            what = f"{step['kind']} ({step['format']})" if step["kind"] else ""
            out.print(f"  {'└─' if i else '  '} {step['path']}  {what}{flag}")
            if step["command"]:
                out.print(f"       {step['command']}", style="dim")
    for p in r["problems"]:
        out.print(f"[red]problem:[/] {p}")


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
