"""Faults a run meets in the real world, with real servers (the session's local stack) and real `tidlq run`
processes: SIGKILL in the middle of a stage, S3 gone during the upload, the MLflow server restarted between runs,
and two runs at once in the same output folder. After each: no damaged cache entry, the rerun completes and reuses
what was finished, and the QDQ model is byte for byte the one of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from flows.quantize import quantize
from tests import servers
from tests.conftest import FAST, PROJECT_ROOT
from tidlq import graph
from tidlq.core import cache, files
from tidlq.core.s3 import StorageUnreachable
from tidlq.results import storage

pytestmark = pytest.mark.slow
MODEL = "mobilenet_v2_tiny"
PARAMS = str(PROJECT_ROOT / "params.yaml")
# Tiny and fast, every stage real: 16x16 images, a small train split, given weights (no float training), no
# sensitivity or baseline.
TINY = FAST | {"data.image_size": 16, "data.val_fraction": 0.35, "data.calib_fraction": 0.45,
               "sensitivity.enabled": False, "verify.baseline": "none", "quant.calibration_batches": 6,
               "verify.min_float_accuracy": 0}  # the jobs quantize untrained models (seeded weights) on purpose
STAGE_FOLDER = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------- helpers


def no_s3(env: dict[str, str]) -> dict[str, str]:
    """The stack's environment without a bucket: runs are tracked but not published to S3."""
    return {k: v for k, v in env.items() if k != "TIDLQ_S3_BUCKET"}


def run_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a `tidlq run` process on the stack, without S3 publishing."""
    return os.environ | no_s3(env)


def start(overrides: dict[str, Any], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`tidlq run` in its own process group (so that a kill takes all of it), output to `log`."""
    args = [f"{k}={_yaml(v)}" for k, v in overrides.items()]
    with open(log, "w") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "tidlq"), "run", "-p", PARAMS,
                                 *[a for pair in zip(["--set"] * len(args), args, strict=True) for a in pair]],
                                env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout) == 0, log.read_text()[-4000:]


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def kill_when(proc: subprocess.Popen, ready: Any, log: Path, timeout: float = 240) -> None:
    """SIGKILL the whole process group as soon as `ready()` is true (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def temp_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(".*.tmp") if p.is_dir()) if folder.is_dir() else []


def stage_folders(out: Path, switched_off: bool = True) -> dict[str, list[Path]]:
    """The final folders of every stage under `out/.stages` (without `switched_off`: only those of stages that ran,
    not the constant folders of stages these params switch off)."""
    def keep(folder: Path) -> bool:
        return STAGE_FOLDER.fullmatch(folder.name) is not None and (
            switched_off or not (folder / graph.SKIPPED).is_file())

    return {d.name: sorted(p for p in d.iterdir() if keep(p))
            for d in sorted((out / ".stages").iterdir()) if d.is_dir()}


def assert_cache_intact(out: Path) -> None:
    """Every stage folder is whole (each file of its manifest with the right digest)."""
    for stage, folders in stage_folders(out).items():
        for folder in folders:
            assert cache.load_intact(folder) is not None, f"{stage}: {folder} is damaged"


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def qdq_digest(summary: dict) -> str:
    return files.sha256_file(Path(summary["artifacts"]["qdq_onnx"]))


def ran(summary: dict) -> list[str]:
    return [name for name, t in summary["stages"].items() if not t["cached"]]


def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def versions_of(client: MlflowClient, model: str, qdq_sha256: str) -> list:
    """The registered versions of `model` that hold the QDQ model of this SHA-256."""
    return client.search_model_versions(f"name = '{model}-qdq' and tag.qdq_sha256 = '{qdq_sha256}'")


def objects(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under `prefix` (one entry per object: a duplicate would show twice)."""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def assert_complete_copy(s3: Any, bucket: str, prefix: str, local: Path) -> None:
    """The prefix holds each local file exactly once, byte for byte, plus the completion marker listing them all."""
    keys = objects(s3, bucket, prefix)
    expected = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    assert sorted(keys) == sorted([prefix + name for name in expected] + [prefix + storage.COMPLETE])
    marker = json.loads(s3.get_object(Bucket=bucket, Key=prefix + storage.COMPLETE)["Body"].read())
    assert marker["objects"] == {prefix + name: files.sha256_file(p) for name, p in expected.items()}
    for name, path in expected.items():
        body = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == files.sha256_file(path), name


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The tiny jobs' overrides: PTQ and QAT of mobilenet, PTQ of resnet; each model with seeded initial weights."""
    import torch

    from tidlq.models import networks as models

    folder = tmp_path_factory.mktemp("weights")
    weights = {}
    for name in (MODEL, "resnet_tiny"):
        torch.manual_seed(0)
        weights[name] = folder / f"{name}.pt"
        torch.save(models.BUILTINS[name](num_classes=10, in_channels=1).state_dict(), weights[name])
    ptq = TINY | {"model.weights": str(weights[MODEL])}
    return {"ptq": ptq, "qat": ptq | {"quant.mode": "qat"},
            "resnet": TINY | {"model.source": "resnet_tiny", "model.weights": str(weights["resnet_tiny"])}}


@pytest.fixture(scope="module")
def reference(prefect_api: str, stack, jobs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Uninterrupted runs (in this process, on the stack, no S3) of the tiny PTQ and QAT jobs: their summaries and
    output folders. Tests that only need cached stages run in these folders too."""
    _, env = stack
    out = {}
    with servers.env_applied(no_s3(env)):
        for mode in ("ptq", "qat"):
            folder = tmp_path_factory.mktemp(f"reference-{mode}")
            summary = quantize(PARAMS, jobs[mode] | {"output_dir": str(folder),
                                                     "tracking.experiment": "it-faults-reference"})
            out[mode] = {"summary": summary, "qdq": qdq_digest(summary), "dir": folder}
    return out


# ---------------------------------------------------------------- SIGKILL mid-stage


def kill_mid(stage: str, overrides: dict, env: dict[str, str], out: Path, log: Path) -> list[str]:
    """Start a run, SIGKILL it while `stage` writes its folder; check that nothing damaged is left that could pass
    for cached. Returns the stages finished before the kill."""
    proc = start(overrides, env, log)
    kill_when(proc, lambda: temp_folders(out / ".stages" / stage), log)
    assert temp_folders(out / ".stages" / stage), "the killed process's temporary folder is there"
    finished = stage_folders(out, switched_off=False)
    assert not finished.get(stage), f"{stage} finished before the kill: the test did not kill it mid-stage"
    assert_cache_intact(out)
    return sorted(name for name, folders in finished.items() if folders)


def inodes(out: Path, stages: list[str]) -> dict[str, tuple[int, int]]:
    """Each stage folder's and manifest's inode: a rebuilt folder gets new ones."""
    folders = stage_folders(out)
    return {s: (folders[s][0].stat().st_ino, (folders[s][0] / cache.MANIFEST).stat().st_ino) for s in stages}


def rerun_to_the_end(overrides: dict, env: dict[str, str], out: Path, log: Path, reused: list[str],
                     ref: dict) -> dict:
    """Run again to the end: exactly the stages `reused` are cached, the QDQ model is the uninterrupted run's, every
    stage folder is whole and the dead processes' temporary folders are gone."""
    finish(start(overrides, env, log), log)
    summary = files.read_json(out / MODEL / "summary.json")
    assert sorted(set(summary["stages"]) - set(ran(summary))) == reused
    assert summary["stage_keys"] == ref["summary"]["stage_keys"]
    assert qdq_digest(summary) == ref["qdq"]
    assert_cache_intact(out)
    assert all(len(folders) == 1 for folders in stage_folders(out).values())
    assert leftovers(out) == []
    return summary


def assert_killed_runs_closed(env: dict[str, str], experiment: str, killed: int) -> None:
    """The MLflow runs of killed processes do not stay RUNNING forever: the next run marks them KILLED."""
    runs = runs_of(MlflowClient(env["MLFLOW_TRACKING_URI"]), experiment)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] + ["KILLED"] * killed
    assert all("ended without ending the run" in r.data.tags["failure_reason"] for r in runs
               if r.info.status == "KILLED")


def test_sigkill_mid_calibrate_then_mid_export(reference: dict, jobs: dict, stack, tmp_path: Path) -> None:
    """Killed in calibrate, then the rerun killed in export_qdq: each time the finished stages stay as they were and
    are reused, the dead process's temporary folder is swept, and the last run ends with the uninterrupted QDQ."""
    env, out = run_env(stack[1]), tmp_path / "outputs"
    overrides = jobs["ptq"] | {"output_dir": str(out), "tracking.experiment": "it-faults-kill-ptq",
                               "tracking.register_model": False}
    first = kill_mid("calibrate", overrides, env, out, tmp_path / "kill1.log")
    assert first == ["evaluate_float", "float_model", "prepare_data"]
    before = inodes(out, first)

    second = kill_mid("export_qdq", overrides, env, out, tmp_path / "kill2.log")
    assert second == sorted(["calibrate", "convert", *first])
    assert temp_folders(out / ".stages" / "calibrate") == []  # the first run's, swept when calibrate ran again
    assert inodes(out, first) == before  # reused as they were, not written again

    summary = rerun_to_the_end(overrides, env, out, tmp_path / "rerun.log", sorted(second), reference["ptq"])
    assert "export_qdq" in ran(summary)
    assert_killed_runs_closed(env, "it-faults-kill-ptq", killed=2)


def test_sigkill_mid_qat_training(reference: dict, jobs: dict, stack, tmp_path: Path) -> None:
    """Killed during QAT training: the rerun reuses data, float model and float evaluation, trains again, and ends
    with the uninterrupted run's QDQ model."""
    env, out = run_env(stack[1]), tmp_path / "outputs"
    overrides = jobs["qat"] | {"output_dir": str(out), "tracking.experiment": "it-faults-kill-qat",
                               "tracking.register_model": False}
    finished = kill_mid("train_qat", overrides, env, out, tmp_path / "kill.log")
    assert finished == ["evaluate_float", "float_model", "prepare_data"]
    summary = rerun_to_the_end(overrides, env, out, tmp_path / "rerun.log", finished, reference["qat"])
    assert "train_qat" in ran(summary)
    assert_killed_runs_closed(env, "it-faults-kill-qat", killed=1)


# ---------------------------------------------------------------- S3 and MLflow servers going away


@pytest.fixture
def upload_outage(stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """Stops SeaweedFS after the third object of an upload; with `plan["back_for_retry"]`, starts it again when the
    upload task's retry begins. Records every put_object that S3 accepted."""
    state, _ = stack
    plan: dict[str, Any] = {"back_for_retry": True, "after": 3, "keys": [], "puts": [], "down": False, "armed": True}
    real_put, real_call = storage.put_verified, storage.call

    def put_verified(s3: Any, path: Path, bucket: str, key: str) -> str:
        if plan["down"] and key in plan["keys"] and plan["back_for_retry"]:  # the retry starts over
            servers.start_service(state, "seaweedfs")
            plan["down"] = False
        digest = real_put(s3, path, bucket, key)
        plan["keys"].append(key)
        if plan["armed"] and len(plan["keys"]) == plan["after"]:
            servers.stop_service(state, "seaweedfs")
            plan["down"], plan["armed"] = True, False
        return digest

    def call(s3: Any, bucket: str, method: str, missing: str | None = None, **kwargs: Any) -> Any:
        result = real_call(s3, bucket, method, missing, **kwargs)
        if method == "put_object":
            plan["puts"].append(kwargs["Key"])
        return result

    monkeypatch.setattr(storage, "put_verified", put_verified)
    monkeypatch.setattr(storage, "call", call)
    try:
        yield plan
    finally:
        if servers.service_pid(state, "seaweedfs") is None:
            servers.start_service(state, "seaweedfs")


def test_s3_stopped_during_upload(reference: dict, jobs: dict, stack, upload_outage: dict) -> None:
    """S3 stops after three objects. Back before the upload's retry: the same run uploads what is missing, nothing
    twice, and its prefix ends complete. Gone for good: the run fails and its half-uploaded prefix has no completion
    marker; the next run (every stage cached) publishes a complete, verified copy under its own run id."""
    _, env = stack
    s3, bucket = servers.s3_client(env), env["TIDLQ_S3_BUCKET"]
    folder = reference["ptq"]["dir"]
    overrides = jobs["ptq"] | {"output_dir": str(folder), "tracking.experiment": "it-faults-s3",
                               "tracking.register_model": False}
    with servers.env_applied(env):
        resumed = quantize(PARAMS, overrides)
    assert ran(resumed) == []
    prefix = resumed["run"]["s3_uri"].removeprefix(f"s3://{bucket}/")
    assert upload_outage["keys"][:3] == upload_outage["keys"][3:6]  # the retry went over the first three again ...
    assert sorted(upload_outage["puts"]) == sorted(objects(s3, bucket, prefix))  # ... but sent each object once
    assert_complete_copy(s3, bucket, prefix, folder / MODEL)

    upload_outage.update(back_for_retry=False, armed=True, keys=[], puts=[])
    with servers.env_applied(env), pytest.raises(StorageUnreachable, match="cannot be reached"):
        quantize(PARAMS, overrides)
    servers.start_service(stack[0], "seaweedfs")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    failed = next(r for r in runs_of(client, "it-faults-s3") if r.info.status == "FAILED")
    failed_prefix = f"tidlq/{MODEL}/{failed.info.run_id}/"
    half = objects(s3, bucket, failed_prefix)
    assert len(half) == 3 and failed_prefix + storage.COMPLETE not in half  # incomplete, and says so

    upload_outage.update(armed=False)
    with servers.env_applied(env):
        rerun = quantize(PARAMS, overrides)
    prefix = rerun["run"]["s3_uri"].removeprefix(f"s3://{bucket}/")
    assert prefix != failed_prefix
    assert_complete_copy(s3, bucket, prefix, folder / MODEL)
    assert objects(s3, bucket, failed_prefix) == half


def test_mlflow_restarted_between_runs(reference: dict, jobs: dict, stack) -> None:
    """Both runs are recorded once each; their QDQ model (the reference's, byte for byte) has one registered
    version, which both runs name."""
    state, env = stack
    folder = reference["ptq"]["dir"]
    overrides = jobs["ptq"] | {"output_dir": str(folder), "tracking.experiment": "it-faults-mlflow"}
    with servers.env_applied(no_s3(env)):
        first = quantize(PARAMS, overrides)
        servers.restart(state, "mlflow")
        second = quantize(PARAMS, overrides)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    ids = {first["run"]["mlflow_run_id"], second["run"]["mlflow_run_id"]}
    runs = runs_of(client, "it-faults-mlflow")
    assert sorted(r.info.run_id for r in runs) == sorted(ids) and len(ids) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(versions_of(client, MODEL, reference["ptq"]["qdq"])) == 1
    assert {client.get_run(i).data.tags["registered_version"] for i in ids} == {
        versions_of(client, MODEL, reference["ptq"]["qdq"])[0].version}


# ---------------------------------------------------------------- two runs at once


def logged(client: MlflowClient, run_id: str, name: str, tmp_path: Path) -> Path:
    """An artifact as the run logged it to MLflow (what this run published, whatever another run wrote later)."""
    return Path(client.download_artifacts(run_id, name, str(tmp_path / run_id)))


def test_runs_at_once_in_one_output_dir(reference: dict, jobs: dict, stack, tmp_path: Path) -> None:
    """Three runs at once in one output folder: mobilenet twice, resnet once. Each stage folder is built once (the
    data stage is shared by both models) and whole; the published folders are each their own model's; the two
    mobilenet runs both succeed, each logs its own summary, and both report the QDQ model of a solo run."""
    env, out = run_env(stack[1]), tmp_path / "outputs"
    same = jobs["ptq"] | {"output_dir": str(out), "tracking.experiment": "it-faults-same-model"}
    other = jobs["resnet"] | {"output_dir": str(out), "tracking.experiment": "it-faults-other-model"}
    procs = [start(job, env, tmp_path / f"run{i}.log") for i, job in enumerate([same, same, other])]
    for i, proc in enumerate(procs):
        finish(proc, tmp_path / f"run{i}.log")
    assert_cache_intact(out)
    assert leftovers(out) == []
    mobilenet, resnet = (files.read_json(out / name / "summary.json") for name in (MODEL, "resnet_tiny"))
    assert (mobilenet["model"], resnet["model"]) == (MODEL, "resnet_tiny")
    assert mobilenet["stage_keys"] == reference["ptq"]["summary"]["stage_keys"]
    assert qdq_digest(mobilenet) == reference["ptq"]["qdq"]
    assert resnet["stage_keys"]["prepare_data"] == mobilenet["stage_keys"]["prepare_data"]
    built = {stage: {f.name for f in folders} for stage, folders in stage_folders(out, switched_off=False).items()
             if folders}
    assert built == {stage: {s["stage_keys"][stage][:16] for s in (mobilenet, resnet)} for stage in built}
    assert Path(resnet["artifacts"]["qdq_onnx"]).parent == out / "resnet_tiny"

    client = MlflowClient(stack[1]["MLFLOW_TRACKING_URI"])
    runs = runs_of(client, "it-faults-same-model")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        summary = files.read_json(logged(client, run.info.run_id, "summary.json", tmp_path))
        assert summary["run"]["mlflow_run_id"] == run.info.run_id  # its own, not the other run's
        assert summary["stage_keys"] == reference["ptq"]["summary"]["stage_keys"]
        assert files.sha256_file(logged(client, run.info.run_id, "model_qdq.onnx", tmp_path)) == reference["ptq"]["qdq"]
    assert len(versions_of(client, MODEL, reference["ptq"]["qdq"])) == 1  # the same model: one version for all
    assert mobilenet["run"]["mlflow_run_id"] in {r.info.run_id for r in runs}
    (resnet_run,) = runs_of(client, "it-faults-other-model")
    assert files.read_json(logged(client, resnet_run.info.run_id, "summary.json", tmp_path))["model"] == "resnet_tiny"
