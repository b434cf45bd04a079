"""The quantize flow against a real Prefect server: quality on the defaults, and the stage cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import yaml
from prefect import flow

from flows.quantize import quantize
from tests.conftest import FAST, PROJECT_ROOT
from tests.stub_stages import COMBINATIONS, combination_id, stub_run
from tidlq import graph, runner
from tidlq.core import files
from tidlq.core.errors import GateFailed
from tidlq.core.params import load_params
from tidlq.quant.onnx_export import FORBIDDEN_OPS
from tidlq.results import uptodate

pytestmark = pytest.mark.slow


def active(overrides: dict) -> list[str]:
    """The stages the graph runs with these params (on top of the defaults), in order."""
    p = load_params(None, overrides)
    return [s.name for s in graph.STAGES if graph.off_because(s, p) is None]


STAGES = active({})
QAT_STAGES = active({"quant.mode": "qat"})


def ran(summary: dict) -> list[str]:
    return [name for name, t in summary["stages"].items() if not t["cached"]]


def test_defaults_quantize_within_one_point(prefect_api: str, tmp_path: Path) -> None:
    """The default job (MobileNetV2-style model, digits, PTQ, TIDL preset): the Done-when numbers."""
    summary = quantize(str(PROJECT_ROOT / "params.yaml"), {"output_dir": str(tmp_path)})
    assert list(summary["stages"]) == STAGES
    assert summary["float"]["accuracy"] > 95.0
    assert abs(summary["accuracy_drop"]) <= 1.0
    assert summary["int8"]["sqnr_db"] > 20.0
    assert summary["int8"]["agreement"] > 97.0
    assert summary["gate"]["passed"] is True
    assert summary["tidl"]["compat"] == {"reject": 0, "arm": 0, "warn": 0}
    published = files.read_json(tmp_path / "mobilenet_v2_tiny" / "summary.json")
    assert published == summary
    model = onnx.load(summary["artifacts"]["qdq_onnx"])
    assert not {n.op_type for n in model.graph.node} & set(FORBIDDEN_OPS)
    onnx.checker.check_model(model, full_check=True)
    options = yaml.safe_load(Path(summary["artifacts"]["tidl_options"]).read_text())
    assert options["advanced_options:quantization_scale_type"] == 4
    for key in ("float.accuracy", "int8.accuracy", "int8.agreement", "int8.sqnr_db", "accuracy_drop",
                "torch_int8.accuracy", "gate.passed", "artifacts.qdq_onnx", "artifacts.float_onnx",
                "artifacts.tidl_options"):
        node = summary
        for part in key.split("."):
            node = node[part]
        assert node is not None


def test_cache_reruns_exactly_what_changed(prefect_api: str, tmp_path: Path) -> None:
    overrides = FAST | {"output_dir": str(tmp_path), "quant.mode": "qat"}
    first = quantize(None, overrides)
    assert ran(first) == QAT_STAGES

    second = quantize(None, overrides)
    assert ran(second) == []
    assert second["stage_keys"] == first["stage_keys"]

    third = quantize(None, overrides | {"qat.epochs": 2})
    assert ran(third) == ["train_qat", "convert", "export_qdq", "verify_onnx", "sensitivity", "tidl_bundle"]

    export_dir = tmp_path / ".stages" / "export_qdq" / third["stage_keys"]["export_qdq"][:16]
    shutil.rmtree(export_dir)
    fourth = quantize(None, overrides | {"qat.epochs": 2})
    assert ran(fourth) == ["export_qdq"]  # rebuilt byte for byte, so everything after it stays cached
    assert fourth["stage_keys"] == third["stage_keys"]

    verify_json = tmp_path / ".stages" / "verify_onnx" / third["stage_keys"]["verify_onnx"][:16] / "verify.json"
    verify_json.write_text("{}")  # damaged on disk: found by its digest, rebuilt
    fifth = quantize(None, overrides | {"qat.epochs": 2})
    assert ran(fifth) == ["verify_onnx"]
    assert files.read_json(verify_json)["gate"]["passed"] is True

    sixth = quantize(None, overrides | {"qat.epochs": 2, "verify.max_accuracy_drop": 50.0})
    assert ran(sixth) == ["verify_onnx"]


def test_gate_failure_still_writes_the_report(prefect_api: str, tmp_path: Path) -> None:
    overrides = FAST | {"output_dir": str(tmp_path), "verify.min_sqnr_db": 99.0}
    with pytest.raises(GateFailed, match="verify.min_sqnr_db 99.0"):
        quantize(None, overrides)
    summary = files.read_json(tmp_path / "mobilenet_v2_tiny" / "summary.json")
    assert summary["gate"]["passed"] is False
    assert summary["gate"]["reasons"][0].startswith("logit SQNR")
    assert Path(summary["artifacts"]["qdq_onnx"]).is_file()


def test_autopilot_keeps_the_best_recipe_and_logs_each_as_a_child_run(prefect_api: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tidlq.results import tracking

    overrides = FAST | {"output_dir": str(tmp_path), "quant.mode": "auto", "tracking.experiment": "it-autopilot",
                        "autopilot.observers": ["histogram", "minmax"], "sensitivity.enabled": False}
    summary = quantize(None, overrides)
    choice = summary["autopilot"]
    rows = {r["label"]: r for r in choice["candidates"]}
    assert list(rows) == ["tidl-histogram", "tidl-histogram-bc", "tidl-minmax", "tidl-minmax-bc"]
    best = max(r["sqnr_db"] for r in rows.values() if r["gate_passed"])
    assert rows[choice["winner"]]["sqnr_db"] == best >= rows["tidl-histogram"]["sqnr_db"]  # never worse than default
    assert summary["int8"]["sqnr_db"] == pytest.approx(best)
    assert summary["recipe"]["observer"] == rows[choice["winner"]]["observer"]
    assert summary["recipe"]["bias_correction"] == rows[choice["winner"]]["bias_correction"]
    client = MlflowClient(tracking.tracking_uri())
    children = client.search_runs([client.get_experiment_by_name("it-autopilot").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['run']['mlflow_run_id']}'")
    assert sorted(c.data.params["observer"] for c in children) == ["histogram", "histogram", "minmax", "minmax"]
    winners = [c for c in children if c.data.tags["autopilot.winner"] == "True"]
    assert len(winners) == 1 and winners[0].data.metrics["sqnr_db"] == pytest.approx(best)
    assert uptodate.check(load_params(None, overrides))["run"] == summary["run"]  # every recipe's folders found


def test_autopilot_falls_back_to_qat_when_no_recipe_passes(prefect_api: str, tmp_path: Path) -> None:
    overrides = FAST | {"output_dir": str(tmp_path), "quant.mode": "auto", "verify.min_sqnr_db": 99.0,
                        "autopilot.observers": ["minmax"], "autopilot.bias_correction": [False],
                        "sensitivity.enabled": False}
    with pytest.raises(GateFailed):
        quantize(None, overrides)
    summary = files.read_json(tmp_path / "mobilenet_v2_tiny" / "summary.json")
    rows = summary["autopilot"]["candidates"]
    assert [r["label"] for r in rows] == ["tidl-histogram", "tidl-minmax", "qat-tidl"]
    assert not any(r["gate_passed"] for r in rows)
    assert summary["autopilot"]["winner"] == max(rows, key=lambda r: r["sqnr_db"])["label"]
    assert "train_qat:qat-tidl" in summary["stages"]
    assert uptodate.check(load_params(None, overrides))["autopilot"]["winner"] == summary["autopilot"]["winner"]


@pytest.mark.parametrize("switches", COMBINATIONS, ids=combination_id)
def test_the_flow_and_dvc_compute_the_same_keys_for_every_switch(prefect_api: str, tmp_path: Path, switches: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "stage_run", stub_run)
    p = load_params(None, {**switches, "output_dir": str(tmp_path / "out")})

    @flow(name="stub-stages")
    def keys() -> dict[str, str]:
        return {name: m.key for name, m in runner.StageRunner(p.stage_root).run([p])[0].items()}

    in_flow = keys()
    dvc = {s.name: runner.build_in_pipeline(s.name, p, tmp_path / "pipeline").key for s in graph.STAGES}
    assert in_flow == {name: dvc[name] for name in in_flow}
    assert set(in_flow) == {s.name for s in graph.STAGES if graph.off_because(s, p) is None}
