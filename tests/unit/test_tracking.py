"""MLflow tracking with the embedded store (real MLflow on SQLite in a temporary folder; the server is in the
integration tests): what a reviewer finds in the UI after a run."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tidlq.core import files
from tidlq.core.params import load_params
from tidlq.results import tracking


def summary(passed: bool) -> dict:
    return {
        "model": "tiny", "mode": "ptq", "qconfig": "tidl", "target_device": "am68a",
        "float": {"accuracy": 98.6, "loss": 0.05}, "int8": {"accuracy": 98.3, "agreement": 99.4, "sqnr_db": 31.0},
        "accuracy_drop": 0.3, "torch_int8": {"accuracy": 98.1, "engine": "x86"},
        "gate": {"passed": passed, "reasons": [] if passed else ["drop"]}, "warnings": [],
        "tidl": {"compat": {"reject": 0, "arm": 0, "warn": 0}},
        "dataset": {"digest": "ab" * 32, "source": "digits", "sizes": {"train": 10}},
        "params_digest": "cd" * 32, "stages": {"calibrate": {"cached": True, "seconds": 0.01}},
        "stage_keys": {"calibrate": "x"}, "artifacts": {"qdq_onnx": "/x"},
    }


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    (out / "tidl").mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out / "model_qdq.onnx")
    (out / "tidl" / "compile_options.yaml").write_text("tensor_bits: 8\n")
    (out / "summary.json").write_text("{}")
    return out


def test_a_run_carries_params_metrics_tags_dataset_artifacts_and_model(published: Path) -> None:
    from mlflow import MlflowClient

    params = load_params(None, {"storage.endpoint_url": "http://secret-endpoint:9000"})
    with tracking.tracked_run(params, "flow-run-id", "flow-run-name") as run:
        registered = tracking.log_results(run, params, summary(True), published,
                                          {"qat": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]})
    client = MlflowClient(run.uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["quant.mode"] == "ptq"
    assert "storage.endpoint_url" not in logged.data.params
    assert "secret-endpoint" not in str(logged.data.params) + str(logged.data.tags)
    assert logged.data.metrics["int8.accuracy"] == 98.3
    assert logged.data.metrics["gate.passed"] == 1.0
    assert logged.data.metrics["stages.calibrate.cached"] == 1.0
    assert [m.value for m in client.get_metric_history(run.run_id, "qat.loss")] == [0.5, 0.25]
    tags = logged.data.tags
    assert tags["prefect.flow_run_id"] == "flow-run-id" and tags["gate"] == "passed"
    assert tags["dataset_digest"] == "ab" * 32 and len(tags["git.commit"]) == 40
    assert tags["version.torch"].startswith("2.")
    assert logged.inputs.dataset_inputs[0].dataset.digest == ("ab" * 32)[:36]
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"model_qdq.onnx", "summary.json", "tidl"} <= artifacts
    assert registered == {"registered_model": "tiny-qdq", "version": "1", "candidate": True, "new_version": True,
                          "pruned": []}
    assert tags[tracking.VERSION_TAG] == "1"
    assert str(client.get_model_version_by_alias("tiny-qdq", "candidate").version) == "1"


def test_failed_gate_registers_without_the_candidate_alias(published: Path) -> None:
    from mlflow import MlflowClient

    params = load_params(None)
    with pytest.raises(RuntimeError, match="gate"), tracking.tracked_run(params, "id", "name") as run:
        tracking.log_results(run, params, summary(False), published, {})
        raise RuntimeError("the quality gate failed")
    client = MlflowClient(run.uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.tags["failure_reason"] == "RuntimeError: the quality gate failed"
    assert client.get_registered_model("tiny-qdq").aliases == {}
    assert client.get_model_version("tiny-qdq", "1").tags["gate"] == "failed"


def qdq_model(published: Path, op: str) -> None:
    """A different one-node model_qdq.onnx (another SHA-256) for each `op`."""
    graph = helper.make_graph([helper.make_node(op, ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), published / "model_qdq.onnx")


def test_the_same_qdq_model_keeps_its_version_and_old_versions_are_pruned(published: Path) -> None:
    """Three runs of one QDQ model: one version, each run tagged with it. A changed model: a new version. Beyond
    `tracking.keep_versions`, the oldest go, except those an alias points at."""
    from mlflow import MlflowClient

    params = load_params(None, {"tracking.keep_versions": 2})
    client = MlflowClient(f"sqlite:///{published.parent / 'mlflow.db'}")

    def run_once(passed: bool = True) -> tuple[str, dict]:
        with tracking.tracked_run(params, "id", "name") as run:
            return run.run_id, tracking.log_results(run, params, summary(passed), published, {})

    runs = [run_once() for _ in range(3)]
    assert [r["version"] for _, r in runs] == ["1"] * 3 and [r["new_version"] for _, r in runs] == [True, False, False]
    assert [client.get_run(i).data.tags[tracking.VERSION_TAG] for i, _ in runs] == ["1"] * 3
    assert len(client.search_model_versions("name = 'tiny-qdq'")) == 1
    assert client.get_model_version("tiny-qdq", "1").run_id == runs[0][0]  # the run that first made it

    client.set_registered_model_alias("tiny-qdq", "champion", "1")
    for op in ("Sigmoid", "Tanh", "Abs"):  # versions 2, 3, 4; the gate of the last one fails
        qdq_model(published, op)
        _, registered = run_once(passed=op != "Abs")
    assert registered["version"] == "4" and registered["pruned"] == ["2"]
    kept = sorted(int(v.version) for v in client.search_model_versions("name = 'tiny-qdq'"))
    assert kept == [1, 3, 4]  # the newest two, and the champion; v3 is also the candidate
    assert client.get_registered_model("tiny-qdq").aliases == {"champion": 1, "candidate": 3}
    assert client.get_model_version("tiny-qdq", "4").tags[tracking.DIGEST_TAG] == files.sha256_file(
        published / "model_qdq.onnx")


def test_unreachable_server_fails_fast_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingUnavailable, match=r"http://127.0.0.1:9 cannot be reached.*tracking.required"):
        tracking.start(load_params(None), "id", "name")
    run = tracking.start(load_params(None, {"tracking.required": False}), "id", "name")
    assert run.run_id is None and "Running without tracking" in run.warning


def test_an_experiment_created_meanwhile_by_another_run_is_used() -> None:
    """Two workers starting runs of one new experiment at once: the one that loses the creation uses the winner's."""
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    winner = MlflowClient(uri).create_experiment("created-meanwhile")

    class LookedTooEarly(MlflowClient):
        """Its first lookup happened before the other run created the experiment."""

        looked = False

        def get_experiment_by_name(self, name: str):  # noqa: ANN202 - MlflowClient's
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    assert tracking.ensure_experiment(LookedTooEarly(uri), "created-meanwhile", uri) == winner
