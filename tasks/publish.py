"""Stage publish: the run's outputs in `<output_dir>/<model name>/`, with `summary.json`. Never cached: it is the
run's side effect, and it is what a person or a script reads after a run.

The folder holds `summary.json`, `model_qdq.onnx`, `float.onnx`, `float.pt`, `int8.pt`, `params.json` (the
validated params of the run) and `tidl/` (the bundle). It is replaced in one rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import files, metrics, report
from tasks.cache import Manifest
from tasks.params import Params, flatten

# (stage, file in its folder) -> name in the published folder
PUBLISHED_FILES = {
    ("export_qdq", "model_qdq.onnx"): "model_qdq.onnx",
    ("evaluate_float", "float.onnx"): "float.onnx",
    ("float_model", "float.pt"): "float.pt",
    ("convert", "int8.pt"): "int8.pt",
}


def run(params: Params, stages: dict[str, Manifest], timings: dict[str, dict], ids: dict[str, Any],
        warnings: list[str], autopilot: dict[str, Any] | None = None) -> dict:
    """Copy the artifacts to the model's output folder, write summary.json and the report; return the summary."""
    final = params.model_dir.resolve()
    summary = build_summary(params, stages, timings, artifact_paths(final)) | {"run": ids, "autopilot": autopilot}
    summary["warnings"] += warnings
    with files.atomic_dir(final) as tmp:
        for (stage, name), published in PUBLISHED_FILES.items():
            shutil.copyfile(stages[stage].path(name), tmp / published)
        shutil.copytree(stages["tidl_bundle"].path("tidl"), tmp / "tidl")
        if "sensitivity" in stages:
            for name in ("sensitivity.json", "sensitivity.png"):
                shutil.copyfile(stages["sensitivity"].path(name), tmp / name)
        files.write_json(tmp / "params.json", params.model_dump(mode="json"))
        files.write_json(tmp / "summary.json", summary)
        report.write(summary, files.read_json(stages["verify_onnx"].path("verify.json")), histories(stages), tmp)
    return summary


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(params: Params, stages: dict[str, Manifest], timings: dict[str, dict], ids: dict[str, Any],
                 warnings: list[str], autopilot: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prefect task around `run` (not cached)."""
    return run(params, stages, timings, ids, warnings, autopilot)


def run_in_pipeline(params: Params, stages: dict[str, Manifest], out: Path) -> dict[str, Any]:
    """The `dvc repro` variant: metrics.json (DVC metrics), plot data (DVC plots), the report and summary.json
    (in report/), into `out`; artifacts stay in their stage folders."""
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


def artifact_paths(final: Path) -> dict[str, str]:
    """Where the published artifacts are."""
    return {"qdq_onnx": str(final / "model_qdq.onnx"), "float_onnx": str(final / "float.onnx"),
            "tidl_options": str(final / "tidl" / "compile_options.yaml"), "tidl_bundle": str(final / "tidl")}


def histories(stages: dict[str, Manifest]) -> dict[str, list[dict]]:
    """Per-epoch training records: float training (when the model was trained) and QAT."""
    out = {"float_train": files.read_json(stages["float_model"].path("model.json"))["history"]}
    if "train_qat" in stages:
        out["qat"] = files.read_json(stages["train_qat"].path("prepared.json"))["history"]
    return out


def with_lint(gate: dict[str, Any], counts: dict[str, int], limit: int | None) -> dict[str, Any]:
    """The verify gate, failed too when the TIDL lint found more rejects than `verify.max_tidl_rejects`."""
    gate = gate | {"max_tidl_rejects": limit}
    if limit is not None and counts["reject"] > limit:
        gate = gate | {"passed": False, "reasons": [*gate["reasons"], f"TIDL lint: {counts['reject']} finding(s) "
                                                    f"TIDL would reject > verify.max_tidl_rejects {limit}"]}
    return gate


def compat_warnings(counts: dict[str, int], device: str) -> list[str]:
    """A warning when the TIDL lint found something TIDL would reject or run on the Arm cores."""
    notes = []
    if counts["reject"]:
        notes.append(f"TIDL lint: {counts['reject']} finding(s) would make TIDL reject the model or compile it wrongly "
                     f"for {device}; see tidl/compat.json.")
    if counts["arm"]:
        notes.append(f"TIDL lint: {counts['arm']} node(s) will run on the Arm cores, not on TIDL; "
                     "see tidl/compat.json.")
    return notes


def sensitivity_summary(stages: dict[str, Manifest]) -> dict[str, Any] | None:
    """The worst layers (ONNX output names, what TIDL matches) and what leaving each in float gains."""
    if "sensitivity" not in stages:
        return None
    report = files.read_json(stages["sensitivity"].path("sensitivity.json"))
    top = [{k: row[k] for k in ("layer", "onnx_output", "sqnr_gain_db", "layer_sqnr_db")}
           for row in report["layers"][:len(report["worst"])]]
    return {"worst": top, "for_16bit": report["for_16bit"]}


def baseline_summary(stages: dict[str, Manifest], verify: dict) -> dict[str, Any] | None:
    """onnxruntime's best quantize_static result beside ours, and how far ahead we are (positive: we are better)."""
    if "baseline_ort" not in stages:
        return None
    ort = files.read_json(stages["baseline_ort"].path("baseline.json"))
    numbers = {k: ort[k] for k in ("accuracy", "accuracy_drop", "agreement", "sqnr_db")}
    return {"tool": "onnxruntime.quantize_static", "method": ort["best"], **numbers,
            "ours_minus_baseline": {"sqnr_db": verify["int8"]["sqnr_db"] - ort["sqnr_db"],
                                    "accuracy": verify["int8"]["accuracy"] - ort["accuracy"]}}


def build_summary(params: Params, stages: dict[str, Manifest], timings: dict[str, dict],
                  artifacts: dict[str, str]) -> dict:
    """summary.json: the numbers every run reports (ARCHITECTURE.md), the stages, and where the artifacts are."""
    verify = files.read_json(stages["verify_onnx"].path("verify.json"))
    data = files.read_json(stages["prepare_data"].path("data.json"))
    model = files.read_json(stages["float_model"].path("model.json"))
    float_metrics = files.read_json(stages["evaluate_float"].path("float_metrics.json"))
    tidl = stages["tidl_bundle"].info
    prepared = stages["train_qat" if "train_qat" in stages else "calibrate"]
    recipe = files.read_json(prepared.path("prepared.json"))
    return {
        "model": model["name"],
        "mode": params.quant.mode,
        "qconfig": recipe["qconfig"],
        "recipe": recipe["recipe"] | {"mode": recipe["mode"], "bias_correction": bool(recipe.get("bias_correction"))},
        "target_device": params.tidl.target_device,
        "float": {"accuracy": float_metrics["accuracy"], "loss": float_metrics["loss"]},
        "int8": verify["int8"],
        "accuracy_drop": verify["accuracy_drop"],
        "torch_int8": verify["torch_int8"],
        "torch_vs_ort": verify["torch_vs_ort"],
        "gate": with_lint(verify["gate"], tidl["compat"], params.verify.max_tidl_rejects),
        "warnings": verify["warnings"] + compat_warnings(tidl["compat"], params.tidl.target_device),
        "tidl": {"compat": tidl["compat"], "quantization_scale_type":
                 tidl["options"]["advanced_options:quantization_scale_type"]},
        "baseline": baseline_summary(stages, verify),
        "sensitivity": sensitivity_summary(stages),
        "dataset": {"digest": data["digest"], "source": data["source"], "sizes": data["sizes"],
                    "input_shape": data["input_shape"], "normalisation": data["normalisation"]},
        "params_digest": files.sha256_json(flatten(params)),
        "stages": timings,
        "stage_keys": {name: m.key for name, m in stages.items()},
        "artifacts": artifacts,
    }
