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

from infra.local.config import DEFAULT_BUCKET, DEFAULT_DIR, PORT_NAMES
from tidlq.core import files
from tidlq.core.errors import GateFailed, NightlyFailed, UserError, is_write_error, write_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tidlq: PyTorch models to TIDL-ready INT8 QDQ ONNX models, as a pipeline of cached stages.")
stack_app = typer.Typer(help="The local stack: S3 (SeaweedFS), MLflow and Prefect on 127.0.0.1.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False)
app.add_typer(stack_app, name="stack")
server_app = typer.Typer(help="The local Prefect server that `tidlq run` starts once and reuses (no PREFECT_API_URL).",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(server_app, name="server")
console = Console()
errors = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML)")]
SetOption = Annotated[list[str], typer.Option("--set", "-s", help="override a param: KEY=VALUE, e.g. quant.mode=qat")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks and debug logs")]
DirOption = Annotated[Path, typer.Option("--dir", help="the stack's state folder: data, logs, pids, env file")]
PortOption = Annotated[list[str], typer.Option("--port", help=f"NAME=PORT, NAME one of {', '.join(PORT_NAMES)}")]
BucketOption = Annotated[str | None, typer.Option("--bucket", help=f"S3 bucket (default {DEFAULT_BUCKET})")]


@app.callback()
def _commands() -> None:
    """tidlq: PyTorch models to TIDL-ready INT8 QDQ ONNX models, as a pipeline of cached stages."""


@app.command()
def run(params: ParamsOption = Path("params.yaml"), set_: SetOption = [],  # noqa: B006 - typer reads the default
        force: Annotated[bool, typer.Option("--force", help="run the flow even when nothing changed")] = False,
        verbose: VerboseOption = False) -> None:
    """Run the quantize flow: data, float model, PTQ or QAT, convert, QDQ export, verify, TIDL bundle, publish.
    When every stage is cached and the last publish still matches, say which run it was and stop (like make)."""
    from tidlq.core.params import load_params, parse_overrides
    from tidlq.results import uptodate

    with user_errors(verbose):
        overrides = parse_overrides(set_)
        p = load_params(params, overrides)  # fail before Prefect starts
        if not force and (published := uptodate.check(p)) is not None:
            print_summary(published, up_to_date=True)
            run_ids = published["run"]
            console.print(f"up to date: nothing changed since MLflow run {run_ids['mlflow_run_id']} "
                          f"(summary {p.model_dir / 'summary.json'}, S3 {run_ids['s3_uri'] or '-'}); nothing to do "
                          "(--force runs the flow anyway)", highlight=False, soft_wrap=True)
            if not published["gate"]["passed"]:
                errors.print(f"[bold red]gate failed:[/] {'; '.join(published['gate']['reasons'])}",
                             highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            return
        use_local_server()
        from flows.quantize import quantize

        configure(verbose)
        try:
            with writing_into(p.output_dir, "set output_dir to another folder"):
                summary = quantize(str(params), overrides)
        except GateFailed as exc:
            print_summary(files.read_json(p.model_dir / "summary.json"))
            errors.print(f"[bold red]gate failed:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        print_summary(summary)


@app.command()
def nightly(params: ParamsOption = Path("params.yaml"), verbose: VerboseOption = False) -> None:
    """Quantize every model of nightly.models as its own deployment run, then check each against its champion
    (needs a Prefect server with the quantize deployment and a worker: make stack-up deploy worker)."""
    import asyncio

    from tidlq.core.params import load_params

    with user_errors(verbose):
        p = load_params(params)
        from flows.nightly import nightly as nightly_flow
        from tidlq.results.nightly import entries

        entries(str(params), p.nightly)  # fail before Prefect starts
        configure(verbose)
        try:
            with patient_prefect():
                results = asyncio.run(nightly_flow(str(params)))
        except NightlyFailed as exc:
            errors.print(f"[bold red]nightly failed:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        table = Table(title="nightly")
        for col in ("model", "status", "int8 accuracy (%)", "SQNR (dB)"):
            table.add_column(col)
        for r in results:
            table.add_row(r["name"], r["status"], f"{r['accuracy']:.2f}", f"{r['sqnr_db']:.1f}")
        console.print(table)


@app.command("results-storage")
def results_storage(name: Annotated[str, typer.Option(help="block name")] = "tidlq-results") -> None:
    """Make S3 (the bucket of TIDLQ_S3_BUCKET) the default result storage of the Prefect server at PREFECT_API_URL,
    so that every worker of that server shares cached stage results."""
    with user_errors(False):
        from infra.results_storage import configure_from_env

        slug, server, bucket = configure_from_env(name)
        console.print(f"results of every run on {server} now go to block {slug} (s3://{bucket}/prefect-results)")


@app.command()
def stage(name: Annotated[str, typer.Argument(help="the stage to build, e.g. calibrate")],
          params: ParamsOption = Path("params.yaml"), set_: SetOption = [],  # noqa: B006 - typer reads the default
          verbose: VerboseOption = False) -> None:
    """Build one stage into pipeline/<name>/ without Prefect (what `dvc repro` runs)."""
    from tidlq.core.params import load_params, parse_overrides

    with user_errors(verbose):
        p = load_params(params, parse_overrides(set_))
        configure(verbose)
        from tidlq import graph, runner

        with writing_into(graph.DVC_ROOT, f"run tidlq stage from a folder where {graph.DVC_ROOT}/ can be written"):
            manifest = runner.build_in_pipeline(name, p)
        console.print(f"{name}: {manifest.dir} ({len(manifest.files)} files)")


@app.command("dvc-yaml")
def dvc_yaml(params: ParamsOption = Path("params.yaml"),
             output: Annotated[Path, typer.Option(help="where to write it")] = Path("dvc.yaml")) -> None:
    """Write dvc.yaml from the stage table (rerun after changing data.source or model.weights to a local path)."""
    with user_errors(False):
        from tidlq import graph
        from tidlq.core.params import load_params

        files.write_text(output, graph.dvc_yaml_text(load_params(params)))
        console.print(f"wrote {output}")


@stack_app.command("up")
def stack_up(state_dir: DirOption = DEFAULT_DIR, port: PortOption = [],  # noqa: B006 - typer reads the default
             bucket: BucketOption = None) -> None:
    """Start the stack (or what of it is not running), wait until healthy and write <dir>/env."""
    from infra.local import stack

    with user_errors(False):
        stack.up(state_dir, _parse_ports(port), bucket)
        _print_stack(state_dir)
    console.print(f"source {state_dir.absolute() / 'env'}", highlight=False, soft_wrap=True)


@stack_app.command("down")
def stack_down(state_dir: DirOption = DEFAULT_DIR) -> None:
    """Stop the stack's processes by their recorded PIDs; all data is kept."""
    from infra.local import stack

    with user_errors(False):
        stopped = stack.down(state_dir)
    console.print(f"stopped PIDs {', '.join(map(str, stopped))}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(state_dir: DirOption = DEFAULT_DIR) -> None:
    """Show which services run, their URLs, PIDs and health."""
    with user_errors(False):
        _print_stack(state_dir)


@server_app.command("status")
def server_status() -> None:
    """Whether the local Prefect server runs: its URL and PID."""
    from infra.local import prefect_server

    server = prefect_server.running(prefect_server.home())
    console.print(f"the local Prefect server runs at {server.url} (PID {server.pid})" if server else
                  f"no local Prefect server runs for PREFECT_HOME {prefect_server.home()}", highlight=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server by its recorded PID; its database stays."""
    from infra.local import prefect_server

    with user_errors(False):
        pid = prefect_server.stop(prefect_server.home())
    console.print(f"stopped the local Prefect server (PID {pid})" if pid else "no local Prefect server was running")


def use_local_server() -> None:
    """Without PREFECT_API_URL, point Prefect at the local server (started now if none runs) instead of a temporary
    one per command."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from infra.local import prefect_server

    server = prefect_server.ensure(prefect_server.home())
    os.environ["PREFECT_API_URL"] = server.url
    console.print(f"Prefect: {'started' if server.started else 'using'} the local server {server.url} (PID "
                  f"{server.pid}; `tidlq server stop` stops it)", highlight=False, soft_wrap=True, style="dim")


def _parse_ports(items: list[str]) -> dict[str, int]:
    """`--port NAME=PORT` options as a dict."""
    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise UserError(f"--port {item}: expected NAME=PORT with PORT in 1..65535")
        ports[name] = int(value)
    return ports


def _print_stack(state_dir: Path) -> None:
    """A table of the stack's services, URLs, PIDs and health."""
    from infra.local import stack

    table = Table(title=f"stack in {state_dir.absolute()}")
    for col in ("service", "url", "pid", "healthy"):
        table.add_column(col)
    for name, info in stack.status(state_dir).items():
        table.add_row(name, info["url"], str(info["pid"] or "-"), "yes" if info["healthy"] else "no")
    console.print(table)


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
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, UserError | GateFailed | NightlyFailed) or is_write_error(exc):
        record.exc_info = None
        record.exc_text = None
    return True


@contextlib.contextmanager
def patient_prefect() -> Iterator[None]:
    """Prefect gives its temporary server 20 s to start, too little on a busy machine (benchmarks/README.md): 120 s,
    unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS says otherwise."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        yield
        return
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
        yield


@contextlib.contextmanager
def writing_into(folder: Path, elsewhere: str) -> Iterator[None]:
    """A write that fails for lack of space or permission is bad input (the output folder), not a crash; `elsewhere`
    says how to write to another folder."""
    try:
        yield
    except OSError as exc:
        if not is_write_error(exc):
            raise
        raise write_error(exc, folder, elsewhere) from exc  # --verbose shows where it failed


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


def print_summary(summary: dict[str, Any], up_to_date: bool = False) -> None:
    """The stage table (cached or run, seconds) and the metrics of a run (`up_to_date`: of the run that a no-op
    run matched)."""
    from tidlq.results.summary import metric_rows

    stages = Table(title=f"{summary['model']}: stages" + (" (of the matching run)" if up_to_date else ""))
    for col in ("stage", "status", "seconds"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for name, t in summary["stages"].items():
        stages.add_row(name, "cached" if t["cached"] else "ran", f"{t['seconds']:.2f}")
    console.print(stages)
    m = Table(title=f"{summary['model']}: {summary['mode']} / {summary['qconfig']} / {summary['target_device']}")
    m.add_column("metric")
    m.add_column("value", justify="right")
    for label, value in metric_rows(summary):
        if label == "gate":
            value = "[green]passed[/]" if summary["gate"]["passed"] else "[red]failed[/]"
        m.add_row(label, value)
    console.print(m)
    if summary.get("autopilot"):
        console.print(autopilot_table(summary["autopilot"]))
    for warning in summary.get("warnings", []):
        errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"QDQ model: {summary['artifacts']['qdq_onnx']}\nTIDL bundle: {summary['artifacts']['tidl_bundle']}")


def autopilot_table(choice: dict[str, Any]) -> Table:
    """The recipes the autopilot tried, the winner marked, and why it won."""
    table = Table(title="autopilot", caption=choice["reason"])
    for col in ("recipe", "accuracy (%)", "drop", "SQNR (dB)", "gate"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for row in choice["candidates"]:
        mark = " *" if row["label"] == choice["winner"] else ""
        table.add_row(row["label"] + mark, f"{row['accuracy']:.2f}", f"{row['accuracy_drop']:.2f}",
                      f"{row['sqnr_db']:.1f}", "passed" if row["gate_passed"] else "failed")
    return table


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
