"""A full flow run against the real MLflow server and SeaweedFS of the local stack, checked through the MLflow client
and boto3; and what happens when S3 or MLflow is unreachable, refuses, or goes away mid-run."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.quantize import quantize
from tests import servers
from tests.conftest import FAST
from tidlq.core import files, s3
from tidlq.results import storage, tracking

pytestmark = pytest.mark.slow
MODEL = "mobilenet_v2_tiny"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_failed_with(env: dict[str, str], experiment: str, text: str) -> None:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert runs[0].info.status == "FAILED"
    assert text in runs[0].data.tags["failure_reason"]


def test_run_is_tracked_on_the_server_and_published_to_s3(prefect_api: str, stack, tmp_path: Path) -> None:
    _, env = stack
    with servers.env_applied(env):
        summary = quantize(None, FAST | {"output_dir": str(tmp_path), "tracking.experiment": "it-tracked"})
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = summary["run"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["int8.accuracy"] == pytest.approx(summary["int8"]["accuracy"])
    assert run.data.metrics["accuracy_drop"] == pytest.approx(summary["accuracy_drop"])
    assert run.data.params["quant.qconfig"] == "tidl"
    assert run.data.tags["prefect.flow_run_id"] == summary["run"]["prefect_flow_run_id"]
    assert run.data.tags["dataset_digest"] == summary["dataset"]["digest"]
    assert run.inputs.dataset_inputs[0].dataset.digest == summary["dataset"]["digest"][:36]
    version = client.get_model_version_by_alias(f"{MODEL}-qdq", "candidate")
    assert str(version.version) == run.data.tags["registered_version"]  # this run's model (or an identical one's)
    assert version.tags["qdq_sha256"] == files.sha256_file(Path(summary["artifacts"]["qdq_onnx"]))
    artifacts = {a.path for folder in (None, "tidl") for a in client.list_artifacts(run_id, folder)}
    assert {"model_qdq.onnx", "summary.json", "report.md", "confusion.png", "tidl/compile_options.yaml"} <= artifacts

    s3 = servers.s3_client(env)
    bucket = env["TIDLQ_S3_BUCKET"]
    prefix = f"tidlq/{MODEL}/{run_id}/"
    assert summary["run"]["s3_uri"] == f"s3://{bucket}/{prefix}"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    local = {p.relative_to(tmp_path / MODEL).as_posix(): p for p in (tmp_path / MODEL).rglob("*") if p.is_file()}
    assert keys == {prefix + name for name in local} | {prefix + storage.COMPLETE}
    for name, path in local.items():
        body = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == files.sha256_file(path)
    mlflow_objects = s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/")["KeyCount"]
    assert mlflow_objects >= len(local)  # the MLflow server keeps its artifacts in the same S3


@pytest.mark.parametrize(("change", "message"), [
    ({"TIDLQ_S3_BUCKET": "no-such-bucket"}, "bucket 'no-such-bucket': the bucket does not exist"),
    ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "access refused"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, "cannot be reached"),
])
def test_s3_problems_fail_before_any_work(prefect_api: str, stack, tmp_path: Path, change: dict,
                                          message: str) -> None:
    _, env = stack
    broken = env | {k: v.format(port=closed_port()) for k, v in change.items()}
    with servers.env_applied(broken), pytest.raises(s3.StorageError, match=message) as err:
        quantize(None, FAST | {"output_dir": str(tmp_path), "tracking.experiment": "it-s3-faults"})
    assert broken["AWS_ENDPOINT_URL"] in str(err.value)
    assert not (tmp_path / ".stages").exists()
    run_failed_with(env, "it-s3-faults", message)


def test_s3_lost_mid_run_keeps_local_outputs(prefect_api: str, stack, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answers the check before the stages and is gone when the outputs are uploaded."""
    state, env = stack
    env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # only the upload meets the outage
    real = storage.preflight

    def preflight_then_s3_dies(dest: storage.Destination | None) -> None:
        real(dest)
        servers.stop_service(state, "seaweedfs")

    monkeypatch.setattr(storage, "preflight", preflight_then_s3_dies)
    try:
        with servers.env_applied(env), pytest.raises(s3.StorageUnreachable, match="cannot be reached"):
            quantize(None, FAST | {"output_dir": str(tmp_path), "tracking.experiment": "it-s3-lost"})
    finally:
        servers.start_service(state, "seaweedfs")
    summary = files.read_json(tmp_path / MODEL / "summary.json")
    assert Path(summary["artifacts"]["qdq_onnx"]).is_file()
    run_failed_with(env, "it-s3-lost", "cannot be reached")


def test_mlflow_down_fails_fast_or_warns(prefect_api: str, stack, tmp_path: Path) -> None:
    _, env = stack
    down = env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    with servers.env_applied(down), pytest.raises(tracking.TrackingUnavailable, match="cannot be reached"):
        quantize(None, FAST | {"output_dir": str(tmp_path)})
    assert not (tmp_path / ".stages").exists()
    with servers.env_applied(down):
        summary = quantize(None, FAST | {"output_dir": str(tmp_path), "tracking.required": False})
    assert summary["run"]["mlflow_run_id"] is None
    assert any("Running without tracking" in w for w in summary["warnings"])
