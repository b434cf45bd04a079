"""MLflow: one run per flow run, with the params, every number of summary.json, tags that say what ran, the dataset
as an input, the artifacts and report, and the QDQ model in the model registry.

The tracking URI comes from MLFLOW_TRACKING_URI (default `sqlite:///mlflow.db`, artifacts in `mlartifacts/` beside
the database).
Nothing here is cached: logging is the run's side effect (a cached logging task would silently log nothing).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.core.params import Params, flatten
from tidlq.eval import metrics
from tidlq.results.uptodate import tracking_uri

# Params that may hold environment details; never logged.
UNLOGGED_PARAMS = ("storage.endpoint_url",)
PROJECT = Path(__file__).resolve().parents[2]
DIGEST_TAG = "qdq_sha256"  # on a model version: the SHA-256 of its model_qdq.onnx
VERSION_TAG = "registered_version"  # on a run: the version of `<model>-qdq` that holds its QDQ model


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached."""


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run of a flow run; `run_id` is None when tracking is off (server down, `tracking.required: false`)."""

    uri: str
    run_id: str | None
    flow_run_id: str
    warning: str | None = None
    experiment_id: str | None = None

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI (a tracking server only; None for a SQLite store or without tracking)."""
        if self.run_id is None or self.experiment_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def check_server(uri: str) -> None:
    """For an HTTP tracking URI, fail within seconds when the server does not answer /health."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:  # noqa: S310 - http(s) only
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"MLflow tracking server {uri} cannot be reached ({reason}). Start it (tidlq stack "
                                  "up), fix MLFLOW_TRACKING_URI, or set tracking.required: false to run without "
                                  "tracking.") from None
    raise TrackingUnavailable(f"MLflow tracking server {uri} is not healthy (/health did not answer 200).")


@contextlib.contextmanager
def tracked_run(params: Params, flow_run_id: str, flow_run_name: str) -> Iterator[TrackedRun]:
    """An MLflow run around the block: FINISHED when it ends, FAILED (with the reason) when it raises."""
    run = start(params, flow_run_id, flow_run_name)
    try:
        yield run
    except BaseException as exc:
        end(run, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    end(run, "FINISHED")


def start(params: Params, flow_run_id: str, flow_run_name: str) -> TrackedRun:
    """Check the server and create the run (before any work, so that a dead server fails the flow fast)."""
    uri = tracking_uri()
    # MLflow's HTTP client retries 7 times with exponential backoff by default: minutes before an error surfaces.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    try:
        check_server(uri)
    except TrackingUnavailable as exc:
        if params.tracking.required:
            raise
        return TrackedRun(uri, None, flow_run_id, f"{exc} Running without tracking (tracking.required: false).")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, params.tracking.experiment, uri)
    name = f"{params.model.display_name}-{params.quant.mode}-{params.tidl.target_device}"
    tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name, **git_tags(),
            "runner.host": socket.gethostname(), "runner.pid": str(os.getpid()), "runner.parent_pid": str(os.getppid()),
            "params_digest": files.sha256_json(flatten(params)), **library_tags()}
    close_orphans(client, experiment_id)
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return TrackedRun(uri, run.info.run_id, flow_run_id, experiment_id=experiment_id)


def close_orphans(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose process, on this host, is gone (killed: it could not end its
    run); return their ids. Runs of other hosts are left alone: their processes may be alive."""
    host = socket.gethostname().replace("'", "")
    orphans = [r for r in client.search_runs([experiment_id], max_results=1000,
                                             filter_string=f"attributes.status = 'RUNNING' and "
                                                           f"tags.`runner.host` = '{host}'")
               if r.data.tags.get("runner.pid", "").isdigit() and not files.pid_alive(int(r.data.tags["runner.pid"]))]
    for run in orphans:
        reason = f"its process {run.data.tags['runner.pid']} on {host} ended without ending the run (killed)"
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_tag(run.info.run_id, "mlflow.note.content", f"Killed: {reason}")
        client.set_terminated(run.info.run_id, "KILLED")
    return [r.info.run_id for r in orphans]


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with local artifacts beside an SQLite store) when missing; when two runs
    create it at once, both get the one that won."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except MlflowException as exc:  # another run (a second worker, say) created it since we looked
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (experiment := client.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id


def local_artifact_root(uri: str) -> str | None:
    """For the embedded SQLite store, artifacts go to `mlartifacts/` beside the database file."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def end(run: TrackedRun, status: str, reason: str | None = None) -> None:
    """Mark the run FINISHED or FAILED; a failure's reason becomes the run's description."""
    if run.run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(run.uri)
    if reason:
        client.set_tag(run.run_id, "failure_reason", reason[:5000])
        client.set_tag(run.run_id, "mlflow.note.content", f"Failed: {reason[:5000]}")
    client.set_terminated(run.run_id, status)


def log_results(run: TrackedRun, params: Params, summary: dict[str, Any], published: Path,
                histories: dict[str, list[dict]]) -> dict[str, Any]:
    """Log params, metrics, tags, dataset, artifacts and the registered model; return what was registered."""
    if run.run_id is None:
        return {}
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(run.uri)
    logged = {k: v for k, v in flatten(params).items() if k not in UNLOGGED_PARAMS}
    client.log_batch(run.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(logged.items())])
    now = _now_ms()
    numbers = metrics.numeric_leaves({k: v for k, v in summary.items() if k not in ("stage_keys", "artifacts")})
    logged_metrics = [Metric(k, v, now, 0) for k, v in numbers.items()]
    for name, history in histories.items():
        logged_metrics += [Metric(f"{name}.{k}", float(v), now, h["epoch"]) for h in history for k, v in h.items()
                           if k != "epoch"]
    for i in range(0, len(logged_metrics), 900):
        client.log_batch(run.run_id, metrics=logged_metrics[i:i + 900])
    client.log_batch(run.run_id, tags=[RunTag(k, str(v)) for k, v in result_tags(summary).items()])
    log_dataset(client, run.run_id, summary["dataset"])
    client.log_artifacts(run.run_id, str(published))
    if summary.get("autopilot"):
        log_candidates(client, run.run_id, summary["autopilot"])
    registered = register(run, params, summary, published) if params.tracking.register_model else {}
    return registered


def log_candidates(client: Any, parent_id: str, choice: dict[str, Any]) -> None:
    """One MLflow child run per recipe the autopilot tried: its recipe as params, its numbers as metrics."""
    from mlflow.entities import Metric, Param

    parent = client.get_run(parent_id)
    now = _now_ms()
    for row in choice["candidates"]:
        tags = {"mlflow.parentRunId": parent_id, "autopilot.winner": str(row["label"] == choice["winner"])}
        child = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}/{row['label']}",
                                  tags=tags)
        recipe = {k: str(row[k]) for k in ("mode", "qconfig", "observer", "bias_correction")}
        numbers = {k: float(row[k]) for k in ("accuracy", "accuracy_drop", "agreement", "sqnr_db", "gate_passed")}
        client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in recipe.items()],
                         metrics=[Metric(k, v, now, 0) for k, v in numbers.items()])
        client.set_terminated(child.info.run_id, "FINISHED")


@task(name="track", cache_policy=NO_CACHE)
def track_task(run: TrackedRun, params: Params, summary: dict[str, Any], published: Path,
               histories: dict[str, list[dict]]) -> dict[str, Any]:
    """Prefect task around `log_results`: never cached (a cached logging task would log nothing)."""
    from mlflow.exceptions import MlflowException

    try:
        registered = log_results(run, params, summary, published, histories)
    except MlflowException as exc:
        raise TrackingUnavailable(f"MLflow at {run.uri} could not record the run ({str(exc).splitlines()[0][:300]}). "
                                  "Check the tracking server and its artifact store; the local outputs are in "
                                  f"{published}.") from None
    if registered:
        from prefect import get_run_logger

        get_run_logger().info(registration_line(registered))
    return registered


def registration_line(registered: dict[str, Any]) -> str:
    """What the registry did, in one log line."""
    name, version = registered["registered_model"], registered["version"]
    line = f"{name} version {version}: " + ("registered" if registered["new_version"] else
                                             "the same QDQ model (SHA-256) as before, no new version")
    if registered["pruned"]:
        line += f"; pruned versions {', '.join(registered['pruned'])} (tracking.keep_versions)"
    return line


def register(run: TrackedRun, params: Params, summary: dict[str, Any], published: Path) -> dict[str, Any]:
    """Register the QDQ model (ONNX flavor) as `<model>-qdq`, once per distinct file: a run whose QDQ model has the
    SHA-256 of a registered version reuses that version (its run carries the tag `registered_version`). Alias
    `candidate` only when the gate passed. Then `prune`: versions beyond the newest `tracking.keep_versions` go."""
    from mlflow import MlflowClient

    name = f"{summary['model']}-qdq"
    client = MlflowClient(run.uri)
    digest = files.sha256_file(published / "model_qdq.onnx")
    same = client.search_model_versions(f"name = '{name}' and tag.{DIGEST_TAG} = '{digest}'")
    version = str(max(int(v.version) for v in same)) if same else \
        log_version(client, run, params, name, published, digest)
    client.set_model_version_tag(name, version, "gate", "passed" if summary["gate"]["passed"] else "failed")
    client.set_model_version_tag(name, version, "params_digest", summary["params_digest"])
    client.set_tag(run.run_id, VERSION_TAG, version)
    if summary["gate"]["passed"]:
        client.set_registered_model_alias(name, "candidate", version)
    pruned = prune(client, name, params.tracking.keep_versions)
    return {"registered_model": name, "version": version, "candidate": summary["gate"]["passed"],
            "new_version": not same, "pruned": pruned}


def log_version(client: Any, run: TrackedRun, params: Params, name: str, published: Path, digest: str) -> str:
    """Log the QDQ model to the run and register it as a new version of `name`, tagged with its SHA-256."""
    import mlflow
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(run.uri)
    mlflow.set_experiment(params.tracking.experiment)  # logged models go to the active experiment, not the run's
    info = mlflow.onnx.log_model(onnx.load(published / "model_qdq.onnx"), name="model_qdq", run_id=run.run_id,
                                 registered_model_name=name, pip_requirements=["onnx", "onnxruntime"],
                                 onnx_execution_providers=["CPUExecutionProvider"], await_registration_for=60)
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, DIGEST_TAG, digest)
    return version


def prune(client: Any, name: str, keep: int) -> list[str]:
    """Delete the versions of `name` older than the newest `keep`, except those an alias points at (champion,
    candidate, any other); the deleted version numbers."""
    aliased = {str(v) for v in client.get_registered_model(name).aliases.values()}
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
    old = [str(v) for v in versions[keep:] if str(v) not in aliased]
    for version in old:
        client.delete_model_version(name, version)
    return old


def log_dataset(client: Any, run_id: str, dataset: dict[str, Any]) -> None:
    """The dataset as an MLflow input, named and digested as in summary.json (MLflow keeps 36 digest chars)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = dataset["source"]
    origin = CodeDatasetSource({"loader": "sklearn.datasets.load_digits"}) if source == "digits" \
        else resolve_dataset_source(source)
    meta = MetaDataset(origin, name=Path(source).name or source, digest=dataset["digest"][:36])
    client.log_inputs(run_id, datasets=[DatasetInput(meta._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", "training")])])


def result_tags(summary: dict[str, Any]) -> dict[str, str]:
    """Tags set once the results are known."""
    return {"model": summary["model"], "mode": summary["mode"], "qconfig": summary["qconfig"],
            "target_device": summary["target_device"], "dataset_digest": summary["dataset"]["digest"],
            "gate": "passed" if summary["gate"]["passed"] else "failed"}


def git_tags() -> dict[str, str]:
    """The project's git commit and whether its work tree had changes ("unknown" outside a checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (subprocess.SubprocessError, OSError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def library_tags() -> dict[str, str]:
    """Versions of the libraries that shape the model."""
    import importlib.metadata

    return {f"version.{lib}": importlib.metadata.version(lib) for lib in ("torch", "onnx", "onnxruntime")}


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
