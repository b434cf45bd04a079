"""The `publish` stage of `dvc repro`: summary.json and the report (in `report/`), metrics.json (DVC metrics) and the
plot data (DVC plots), into `pipeline/publish/`; the artifacts stay in their stage folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidlq.core import cache, files
from tidlq.eval import metrics
from tidlq.results import report
from tidlq.results.summary import build_summary, histories

if TYPE_CHECKING:
    from tidlq.core.params import Params

STAGE = "publish"


def build(params: Params, stages: dict[str, cache.Manifest], folder: Path) -> cache.Manifest:
    """The publish folder for these params and stage folders (rebuilt when any of them changed)."""
    key = cache.stage_key(STAGE, __name__, [params, *stages.values()])
    return cache.write_stage(folder, STAGE, key, lambda out: write(params, stages, out))


def write(params: Params, stages: dict[str, cache.Manifest], out: Path) -> dict[str, Any]:
    """Write the report, summary, metrics and plot data of the stage folders into `out`."""
    qdq, bundle = stages["export_qdq"].dir, stages["tidl_bundle"].dir / "tidl"
    summary = build_summary(params, stages, {}, {
        "qdq_onnx": str(qdq / "model_qdq.onnx"), "float_onnx": str(stages["evaluate_float"].dir / "float.onnx"),
        "tidl_options": str(bundle / "compile_options.yaml"), "tidl_bundle": str(bundle)})
    (out / "report").mkdir()
    files.write_json(out / "report" / "summary.json", summary)
    keys = ("float", "int8", "accuracy_drop", "torch_int8", "torch_vs_ort", "gate", "tidl")
    files.write_json(out / "metrics.json", metrics.numeric_leaves({k: summary[k] for k in keys}))
    files.write_json(out / "accuracy.json", [
        {"model": "float", "accuracy": summary["float"]["accuracy"]},
        {"model": "int8 (onnxruntime)", "accuracy": summary["int8"]["accuracy"]},
        {"model": f"int8 (torch {summary['torch_int8']['engine']})", "accuracy": summary["torch_int8"]["accuracy"]}])
    runs = histories(stages)
    phase = "qat" if "qat" in runs else "float_train"
    files.write_json(out / "training.json", [{"phase": phase, "epoch": h["epoch"], "loss": h["loss"],
                                              "accuracy": h.get("val_accuracy", h["train_accuracy"])}
                                             for h in runs[phase]])
    report.write(summary, files.read_json(stages["verify_onnx"].path("verify.json")), runs, out / "report")
    return {"gate": summary["gate"]}
