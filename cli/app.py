"""The typer app, global options and the one error funnel every command goes through."""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from mk.core import __version__
from mk.core.console import configure, console
from mk.core.errors import INTERRUPTED, RUNTIME_FAILURE, BadInput, GateFailed, MkError

# click's exceptions, from wherever this typer takes click (it vendors it since 0.26)
_click = importlib.import_module(typer.BadParameter.__module__)
_NO_ARGS_IS_HELP = getattr(_click, "NoArgsIsHelpError", ())


class _Group(TyperGroup):
    """Usage errors (a bad option value, an unknown option) in the contract's style,
    `error: …` / `hint: …` and exit 2, instead of click's usage block and `Error: …`."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # a bare `mk`: the help, as click shows it
            typer.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except _click.UsageError as e:
            message = e.format_message()
            where = e.ctx.command_path if e.ctx is not None else "mk"
            report(MkError(message[:1].lower() + message[1:], hint=f"see `{where} --help`"))
            sys.exit(e.exit_code)
        except _click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="mk",
    help="From a pretrained model and a labelled dataset to a fast, measured, served deployment.\n\n"
         "Each step reads an artifact folder and writes one, printing its path on stdout, so steps pipe:\n\n"
         "\b\n  mk prep tweets -o data | mk tune --model minilm -o tuned \\\n"
         "    | mk quant -o int8 | mk bench",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion SHELL
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"mk {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings and errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug detail on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print mk's version.")] = False,
):
    """Environment: NO_COLOR turns colour off; MK_DEBUG=1 shows tracebacks."""
    configure(quiet=quiet, verbose=verbose)


def report(err: MkError) -> None:
    from rich.markup import escape  # messages name things like mk[gpu], which are not markup

    console.print(f"[bold red]error:[/] {escape(err.message)}", markup=True, highlight=False, soft_wrap=True)
    if err.hint:
        console.print(f"[bold]hint:[/] {escape(err.hint)}", markup=True, highlight=False, soft_wrap=True)


def _debug() -> bool:
    return os.environ.get("MK_DEBUG", "") not in ("", "0")


def _check_finite(options: dict) -> None:
    """NaN and infinity are no tolerance, allowance, duration or rate: refused up front
    for every float option, before minutes of work end in a meaningless gate."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"--{name.replace('_', '-')} {value}: expected a finite number")


def command(name: str, **kwargs):
    """Register a command whose errors end as `error: …` / `hint: …` and the
    contract's exit code; MK_DEBUG=1 re-raises for the traceback."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            from mk.cli.output import emit

            try:
                _check_finite(kw)
                return fn(*args, **kw)
            except GateFailed as e:
                if e.path is not None:  # the artifact was written for inspection
                    emit(e.path, e.result, as_json=kw.get("as_json", False))
                report(e)
                raise typer.Exit(e.code) from None
            except MkError as e:
                if _debug():
                    raise
                report(e)
                raise typer.Exit(e.code) from None
            except KeyboardInterrupt:
                if _debug():
                    raise
                console.print("interrupted: no output was written", style="yellow")
                raise typer.Exit(INTERRUPTED) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as e:
                if _debug():
                    raise
                report(MkError(f"unexpected {type(e).__name__}: {e}",
                               hint="rerun with MK_DEBUG=1 for the traceback, and report it"))
                raise typer.Exit(RUNTIME_FAILURE) from None

        app.command(name, **kwargs)(run)
        return fn

    return register
