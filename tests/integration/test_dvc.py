"""`dvc repro` in a fresh git checkout of the project: it builds every stage, reruns exactly what a params change
touches, builds the same QDQ model as `tidlq run`, and `dvc push` / `dvc pull` through the local stack's S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT
from tidlq.core import files

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
QUICK = {"data": {"image_size": 16}, "float_train": {"epochs": 2}, "quant": {"mode": "qat", "calibration_batches": 2},
         "qat": {"epochs": 1}, "verify": {"max_accuracy_drop": 100.0, "min_sqnr_db": -100.0},
         "sensitivity": {"images": 40}}


def checkout(dest: Path) -> Path:
    """The project's tracked files (as they are in the work tree) in a new git repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


def sh(cwd: Path, *cmd: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    full = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"} | (env or {})
    done = subprocess.run(list(cmd), cwd=cwd, env=full, capture_output=True, text=True, timeout=900)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


PUBLISH_MANIFEST = "pipeline/publish/manifest.json"


def outs(repo: Path) -> dict[str, str]:
    """The digest of every file DVC or git owns under pipeline/: not .gitignore, the stages' lock files, nor the
    publish stage's own manifest (git ignores it: it is not an out of dvc.yaml)."""
    return {p.relative_to(repo).as_posix(): files.sha256_file(p) for p in (repo / "pipeline").rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.relative_to(repo).as_posix() != PUBLISH_MANIFEST}


def set_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = checkout(tmp_path_factory.mktemp("checkout"))
    set_params(repo, QUICK)
    return repo


def test_committed_dvc_yaml_is_generated_from_the_stage_table(tmp_path: Path) -> None:
    sh(PROJECT_ROOT, "tidlq", "dvc-yaml", "--output", str(tmp_path / "dvc.yaml"))
    assert (tmp_path / "dvc.yaml").read_text() == (PROJECT_ROOT / "dvc.yaml").read_text()


def test_repro_builds_then_reruns_only_what_changed(repo: Path) -> None:
    first = sh(repo, "dvc", "repro").stdout
    assert ran(first) == ["prepare_data", "float_model", "evaluate_float", "baseline_ort", "calibrate", "train_qat",
                          "convert", "export_qdq", "verify_onnx", "sensitivity", "tidl_bundle", "publish"]
    assert files.read_json(repo / "pipeline" / "calibrate" / "skipped.json")["reason"] == "quant.mode is qat"
    metrics = files.read_json(repo / "pipeline" / "publish" / "metrics.json")
    assert metrics["int8.accuracy"] > 80.0 and metrics["gate.passed"] == 1.0
    training = files.read_json(repo / "pipeline" / "publish" / "training.json")
    assert [r["phase"] for r in training] == ["qat"] and training[0]["epoch"] == 1

    assert ran(sh(repo, "dvc", "repro").stdout) == []
    assert "up to date" in sh(repo, "dvc", "status").stdout

    set_params(repo, {"qat": {"epochs": 2}})
    assert ran(sh(repo, "dvc", "repro").stdout) == ["train_qat", "convert", "export_qdq", "verify_onnx",
                                                     "sensitivity", "tidl_bundle", "publish"]
    set_params(repo, {"verify": {"max_accuracy_drop": 50.0}})
    assert ran(sh(repo, "dvc", "repro").stdout) == ["verify_onnx", "publish"]


def test_dvc_and_the_flow_build_the_same_model(repo: Path, prefect_api: str) -> None:
    sh(repo, "dvc", "repro")
    sh(repo, "tidlq", "run", "--set", "output_dir=flow-out", env={"PREFECT_API_URL": prefect_api})
    summary = files.read_json(repo / "flow-out" / "mobilenet_v2_tiny" / "summary.json")
    dvc_summary = files.read_json(repo / "pipeline" / "publish" / "report" / "summary.json")
    assert summary["stage_keys"] == dvc_summary["stage_keys"]
    assert files.sha256_file(repo / "flow-out" / "mobilenet_v2_tiny" / "model_qdq.onnx") == \
        files.sha256_file(repo / "pipeline" / "export_qdq" / "model_qdq.onnx")


@pytest.mark.parametrize(("args", "message"), [
    (["stage", "calibrat"], "unknown stage 'calibrat'; the stages are: prepare_data"),
    (["stage", "convert"], "stage convert needs pipeline/train_qat/, made by stage train_qat"),
])
def test_stage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path)
    set_params(tmp_path, QUICK)
    done = sh(tmp_path, "tidlq", *args, ok=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_stage_refuses_inputs_built_from_other_params(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    set_params(repo, {"quant": {"qconfig": "x86"}})
    done = sh(repo, "tidlq", "stage", "convert", ok=False)
    assert done.returncode == 2
    assert "needs pipeline/train_qat/, but it was built from other params or inputs" in done.stderr
    set_params(repo, {"quant": {"qconfig": "tidl"}})


def test_push_then_pull_into_a_fresh_checkout(repo: Path, stack, tmp_path: Path) -> None:
    _, env = stack
    sh(repo, "dvc", "repro")
    for key, value in (("endpointurl", env["AWS_ENDPOINT_URL"]), ("access_key_id", env["AWS_ACCESS_KEY_ID"]),
                       ("secret_access_key", env["AWS_SECRET_ACCESS_KEY"])):
        sh(repo, "dvc", "remote", "modify", "--local", "storage", key, value)
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock")
    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(fresh))
    shutil.copy(repo / ".dvc" / "config.local", fresh / ".dvc" / "config.local")
    sh(fresh, "dvc", "pull")
    built, pulled = outs(repo), outs(fresh)
    assert pulled == built and len(built) > 30
    assert "up to date" in sh(fresh, "dvc", "status").stdout
