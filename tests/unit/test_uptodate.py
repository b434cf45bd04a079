"""The up-to-date check of `tidlq run`: it matches the last publish only while every stage folder, the params, the
published files, the environment's targets and the MLflow run all still hold; and it loads no heavy library."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT
from tests.stub_stages import stub_run
from tidlq import graph, runner
from tidlq.core import files
from tidlq.core.params import Params, flatten, load_params
from tidlq.results import uptodate


def publish(p: Params, run_id: str | None) -> dict[str, Any]:
    """What a publish leaves that the check reads: the stage folders (stand-in stages), summary.json and the
    record."""
    manifests = runner.build_all(p, p.stage_root)
    summary = {"stage_keys": {n: m.key for n, m in manifests.items()}, "params_digest": files.sha256_json(flatten(p)),
               "run": {"mlflow_run_id": run_id, "prefect_flow_run_id": "f", "s3_uri": None}, "gate": {"passed": True}}
    files.write_json(p.model_dir / "summary.json", summary)
    (p.model_dir / "model_qdq.onnx").write_bytes(b"qdq")
    uptodate.record(p, summary)
    return summary


@pytest.fixture
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.setattr(graph, "stage_run", stub_run)
    return load_params(None, {"output_dir": str(tmp_path / "out")})


@pytest.fixture
def mlflow_run() -> str:
    from mlflow import MlflowClient

    client = MlflowClient(uptodate.tracking_uri())
    return client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id


def test_a_publish_matches_until_anything_it_depends_on_changes(params: Params, mlflow_run: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    summary = publish(params, mlflow_run)
    assert uptodate.check(params) == summary
    assert uptodate.check(params.model_copy(update={"output_dir": params.output_dir / "other"})) is None

    changed = load_params(None, {"output_dir": str(params.output_dir), "quant.calibration_batches": 3})
    assert uptodate.check(changed) is None  # calibrate's folder for these params does not exist
    publish(changed, mlflow_run)
    assert uptodate.check(changed) is not None and uptodate.check(params) is None  # the published summary is other
    publish(params, mlflow_run)

    untracked = load_params(None, {"output_dir": str(params.output_dir), "tracking.experiment": "elsewhere"})
    assert uptodate.check(untracked) is None  # same stage keys, other params

    monkeypatch.setenv("TIDLQ_S3_BUCKET", "tidlq")
    assert uptodate.check(params) is None  # this run would upload; the last one did not
    monkeypatch.delenv("TIDLQ_S3_BUCKET")
    assert uptodate.check(params) == summary


@pytest.mark.parametrize("damage", ["stage file", "stage folder", "published file", "record", "publish code",
                                    "mlflow run", "tracking uri", "untracked"])
def test_damage_means_running_again(params: Params, mlflow_run: str, damage: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    publish(params, None if damage == "untracked" else mlflow_run)
    folder = runner.build_all(params, params.stage_root)["export_qdq"]  # finds it built
    record = uptodate.record_path(params.model_dir.resolve())
    if damage == "stage file":
        folder.path("out.json").write_text("{}")
    elif damage == "stage folder":
        shutil.rmtree(folder.dir)
    elif damage == "published file":
        (params.model_dir / "model_qdq.onnx").write_bytes(b"edited")
    elif damage == "record":
        record.write_text(json.dumps({"files": {}}))
    elif damage == "publish code":  # as if tidlq.results.publish or a module it imports had changed since
        record.write_text(json.dumps(json.loads(record.read_text()) | {"code": "0" * 64}))
    elif damage == "mlflow run":
        from mlflow import MlflowClient

        MlflowClient(uptodate.tracking_uri()).delete_run(mlflow_run)
    elif damage == "tracking uri":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert uptodate.check(params) is None


def test_the_check_loads_neither_torch_nor_prefect_nor_mlflow(params: Params, mlflow_run: str) -> None:
    publish(params, mlflow_run)
    code = ("import sys; from tidlq.core.params import load_params; from tidlq.results import uptodate; "
            f"p = load_params(None, {{'output_dir': {str(params.output_dir)!r}}}); "
            "print(uptodate.check(p) is not None, sorted({'torch', 'prefect', 'mlflow', 'onnx'} & set(sys.modules)))")
    # the stand-in stages wrote the folders: their keys are the real stages', so the check in a fresh process
    # (real stages, never run) finds them
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "[]"]
