"""The option vocabulary of mk, defined once: the same flag means the same thing
in every command that takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Output = Annotated[Path, typer.Option("-o", "--output", help="Artifact folder to write (atomically).")]
OptionalOutput = Annotated[Optional[Path], typer.Option("-o", "--output", help="Artifact folder to write.")]
Data = Annotated[Optional[Path], typer.Option(
    "--data", help="Dataset artifact (from `mk prep`); defaults to the one in the input's lineage.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2 ** 32 - 1, help="Seed for every random choice; same seed, same result.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads for torch and ONNX Runtime (reported).  [default: physical cores]")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per batch.")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", min=8, help="Tokens per example.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON object on stdout instead of the path.")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow pickled checkpoints (pytorch_model.bin); they can run code when loaded.")]

ApiKey = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="MK_API_KEY", show_envvar=True, show_default=False,
    help="The server's key, sent as `Authorization: Bearer KEY` (mk serve checks it on every route but health "
         "and metrics).")]


Confidence = Annotated[float, typer.Option(
    "--confidence", help="How sure the accuracy gate must be that the drop exceeds --max-drop before it fails "
                         "(exact interval on the paired answers of parent and child).")]
GateTest = Annotated[str, typer.Option(
    "--gate-test", help="paired: fail when the drop's --confidence interval lies wholly above --max-drop "
                        "(McNemar-style, knows the sample size); point: fail when the observed drop is above it.")]


def comma_list(text: str) -> list[str]:
    """`MatMul, Gather` → ["MatMul", "Gather"]: how every comma-separated option reads."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def input_argument(help: str):
    """A positional input path that may instead arrive on piped stdin."""
    return typer.Argument(help=f"{help} Read from stdin when omitted and stdin is piped.",
                          show_default=False)


# Triton model repository (mk export-onnx, mk export-trt): one group, one meaning.
TritonRepo = Annotated[Optional[Path], typer.Option(
    "--triton-repo", help="Also write a Triton model repository here: DIR/NAME/config.pbtxt and the model "
                          "in DIR/NAME/1/, as Triton Inference Server loads it.")]
TritonName = Annotated[Optional[str], typer.Option(
    "--triton-name", help="The model's name in the Triton repository.  [default: the -o folder's name]")]
TritonInstances = Annotated[Optional[int], typer.Option(
    "--triton-instances", min=1, help="Model instances in Triton's instance group.  [default: 1]",
    show_default=False)]

# the core key of each --triton-* option that only applies with --triton-repo
TRITON_FLAGS = {"name": "--triton-name", "count": "--triton-instances", "kind": "--triton-instance-kind",
                "max_batch_size": "--triton-max-batch-size"}


def triton(repo: Optional[Path], **given) -> dict | None:
    """The --triton-* options as the dict core takes (None without --triton-repo, where
    any other --triton-* option is refused, as mk refuses an option of a mode not chosen).
    `given`: core key → value, None where the option was not given (core has the defaults)."""
    if repo is None:
        only_with("--triton-repo DIR", repo, {TRITON_FLAGS[k]: v for k, v in given.items()})
        return None
    return {"repo": repo, **{k: v for k, v in given.items() if v is not None}}


def only_with(flag: str, value, given: dict) -> None:
    """Options of a mode not chosen (`flag` absent) are refused, never silently ignored.
    `given`: option → value, None where the option was not given."""
    stray = [name for name, v in given.items() if v is not None]
    if value is None and stray:
        from mk.core.errors import BadInput
        raise BadInput(f"{' and '.join(stray)} only appl{'y' if len(stray) > 1 else 'ies'} with {flag.split()[0]}",
                       hint=f"pass {flag}, or drop {'them' if len(stray) > 1 else 'it'}")
