"""`tidlq`: the command line. Its commands only load params and start flows or stages.

Bad input ends with a one-paragraph message and exit code 2 (no traceback unless --verbose); a failed quality gate
ends with exit code 1 after the report is printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasks import files
from tasks.errors import GateFailed, UserError
from tasks.params import load_params, parse_overrides

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tidlq: PyTorch models to TIDL-ready INT8 QDQ ONNX models, as a pipeline of cached stages.")
console = Console()
errors = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML)")]
SetOption = Annotated[list[str], typer.Option("--set", "-s", help="override a param: KEY=VALUE, e.g. quant.mode=qat")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks and debug logs")]


@app.callback()
def _commands() -> None:
    """tidlq: PyTorch models to TIDL-ready INT8 QDQ ONNX models, as a pipeline of cached stages."""


@app.command()
def run(params: ParamsOption = Path("params.yaml"), set_: SetOption = [],  # noqa: B006 - typer reads the default
        verbose: VerboseOption = False) -> None:
    """Run the quantize flow: data, float model, PTQ or QAT, convert, QDQ export, verify, TIDL bundle, publish."""
    with user_errors(verbose):
        overrides = parse_overrides(set_)
        p = load_params(params, overrides)  # fail before Prefect starts
        from flows.quantize import quantize

        configure(verbose)
        try:
            summary = quantize(str(params), overrides)
        except GateFailed as exc:
            print_summary(files.read_json(p.model_dir / "summary.json"))
            errors.print(f"[bold red]gate failed:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        print_summary(summary)


def configure(verbose: bool) -> None:
    """Entry-point configuration: no telemetry, quiet torch.ao deprecation noise, user errors without tracebacks."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", module=r"torch\.onnx\..*")
        for handler in logging.getLogger().handlers:  # Prefect's console handler sits on the root logger
            handler.addFilter(_hide_user_error_tracebacks)


def _hide_user_error_tracebacks(record: logging.LogRecord) -> bool:
    """Console logs keep the message of a user error but not its traceback (the API log keeps both)."""
    if record.exc_info and isinstance(record.exc_info[1], UserError | GateFailed):
        record.exc_info = None
        record.exc_text = None
    return True


@contextlib.contextmanager
def user_errors(verbose: bool) -> Iterator[None]:
    """Turn a UserError into its message and exit code 2."""
    try:
        yield
    except UserError as exc:
        if verbose:
            raise
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def print_summary(summary: dict[str, Any]) -> None:
    """The stage table (cached or run, seconds) and the metrics of a run."""
    stages = Table(title=f"{summary['model']}: stages")
    for col in ("stage", "status", "seconds"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for name, t in summary["stages"].items():
        stages.add_row(name, "cached" if t["cached"] else "ran", f"{t['seconds']:.2f}")
    console.print(stages)
    m = Table(title=f"{summary['model']}: {summary['mode']} / {summary['qconfig']} / {summary['target_device']}")
    m.add_column("metric")
    m.add_column("value", justify="right")
    rows = [
        ("float accuracy (%)", f"{summary['float']['accuracy']:.2f}"),
        ("int8 accuracy, onnxruntime QDQ (%)", f"{summary['int8']['accuracy']:.2f}"),
        ("accuracy drop (points)", f"{summary['accuracy_drop']:.2f}"),
        ("int8 top-1 agreement with float (%)", f"{summary['int8']['agreement']:.2f}"),
        ("int8 logit SQNR (dB)", f"{summary['int8']['sqnr_db']:.1f}"),
        (f"torch int8 accuracy, {summary['torch_int8']['engine']} engine (%)",
         f"{summary['torch_int8']['accuracy']:.2f}"),
        ("TIDL lint: reject / arm / warn", "{reject} / {arm} / {warn}".format(**summary["tidl"]["compat"])),
        ("gate", "[green]passed[/]" if summary["gate"]["passed"] else "[red]failed[/]"),
    ]
    for row in rows:
        m.add_row(*row)
    console.print(m)
    for warning in summary.get("warnings", []):
        errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"QDQ model: {summary['artifacts']['qdq_onnx']}\nTIDL bundle: {summary['artifacts']['tidl_bundle']}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
