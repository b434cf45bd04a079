"""Whether a `tidlq run` has anything to do, answered in about a second: no Prefect, no torch, no MLflow client.

A publish ends by writing `<model>.published.json` beside the model's output folder (`record`; beside it, because
the folder is what MLflow and S3 hold): where it was tracked and uploaded (the environment's MLflow tracking URI and
S3 bucket and endpoint), the MLflow run and S3 URI, and the SHA-256 of every published file. `check` finds the run
up to date when
- every stage folder the run needs (the autopilot's recipes included) is present and intact (`tidlq.runner.Probe`);
- the published summary was built from those stage keys and from the same params (its `params_digest`);
- the published files are the ones recorded, the record's targets are the current ones, and so is the code that
  publishes (`tidlq.results.publish` and the project modules it imports: a changed report is work to do);
- the recorded MLflow run still exists (a publish without tracking never counts: every run is tracked once).

The record is written last and names the digests of the folder it describes, so a publish that died half-way (a new
folder, an old record) does not match and the next run does the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tidlq.core import cache, files
from tidlq.core.params import Params, flatten

DEFAULT_URI = "sqlite:///mlflow.db"
PUBLISH_CODE = "tidlq.results.publish"  # the code of a publish (summary, report, tracking, S3) is part of the match


def tracking_uri() -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI, or a SQLite file in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def targets(params: Params) -> dict[str, str | None]:
    """Where a run of `params` is tracked and uploaded, from the params and the environment (a relative SQLite
    path made absolute: another folder is another database)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return {"mlflow": uri, "s3_bucket": params.storage.bucket or os.environ.get("TIDLQ_S3_BUCKET"),
            "s3_endpoint": params.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")}


def record(params: Params, summary: dict[str, Any]) -> None:
    """Write the record of a publish beside the model's output folder: the last step of a publish."""
    folder = params.model_dir.resolve()
    files.write_json(record_path(folder), {"targets": targets(params), **summary["run"], "files": digests(folder),
                                           "code": cache.code_digest(PUBLISH_CODE)})


def record_path(folder: Path) -> Path:
    """`<output_dir>/<model>.published.json`."""
    return folder.with_name(f"{folder.name}.published.json")


def check(params: Params) -> dict[str, Any] | None:
    """The published summary of a run these params would only repeat, or None when the run has work to do."""
    from tidlq import autopilot
    from tidlq.runner import Probe, Stale

    folder = params.model_dir.resolve()
    try:
        rec = files.read_json(record_path(folder))
        summary = files.read_json(folder / "summary.json")
    except (OSError, ValueError):
        return None
    probe = Probe(params.stage_root)
    try:
        outcome = autopilot.search(probe, params) if params.quant.mode == "auto" else probe.outcome(params)
    except Stale:
        return None
    same = (summary.get("stage_keys") == {name: m.key for name, m in outcome.manifests.items()}
            and summary.get("params_digest") == files.sha256_json(flatten(params))
            and rec.get("targets") == targets(params)
            and rec.get("files") == digests(folder)
            and rec.get("code") == cache.code_digest(PUBLISH_CODE)
            and rec.get("mlflow_run_id") is not None
            and run_exists(rec["targets"]["mlflow"], rec["mlflow_run_id"]))
    return summary if same else None


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a published folder."""
    return {p.relative_to(folder).as_posix(): files.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_exists(uri: str, run_id: str) -> bool:
    """Whether MLflow at `uri` still holds run `run_id`, not deleted: its REST API for a server, the database for a
    SQLite URI (both without loading MLflow); False when it cannot tell."""
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http(s) only
                stage = json.load(response)["run"]["info"].get("lifecycle_stage")
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False
        return stage == "active"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
                row = db.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        except sqlite3.Error:
            return False
        return row is not None and row[0] == "active"
    return False
