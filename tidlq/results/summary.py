"""summary.json: the numbers every run reports (ARCHITECTURE.md), read from the stage folders, and the one table of
them that the command line and the report both show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidlq.core import files
from tidlq.core.cache import Manifest
from tidlq.core.params import Params, flatten


def build_summary(params: Params, stages: dict[str, Manifest], timings: dict[str, dict],
                  artifacts: dict[str, str]) -> dict:
    """summary.json: the numbers every run reports, the stages, and where the artifacts are."""
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


def artifact_paths(final: Path) -> dict[str, str]:
    """Where the published artifacts are in a model's output folder."""
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


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's key numbers as (label, value) rows: the command line's table and the report's."""
    compat = summary["tidl"]["compat"]
    gate = "passed" if summary["gate"]["passed"] else "FAILED: " + "; ".join(summary["gate"]["reasons"])
    rows = [
        ("float accuracy (%)", f"{summary['float']['accuracy']:.2f}"),
        ("int8 accuracy, QDQ in onnxruntime (%)", f"{summary['int8']['accuracy']:.2f}"),
        ("accuracy drop (points)", f"{summary['accuracy_drop']:.2f}"),
        ("int8 top-1 agreement with float (%)", f"{summary['int8']['agreement']:.2f}"),
        ("int8 logit SQNR (dB)", f"{summary['int8']['sqnr_db']:.1f}"),
        (f"torch int8 accuracy, {summary['torch_int8']['engine']} engine (%)",
         f"{summary['torch_int8']['accuracy']:.2f}"),
        ("TIDL lint: reject / arm / warn", f"{compat['reject']} / {compat['arm']} / {compat['warn']}"),
    ]
    if summary.get("baseline"):
        b = summary["baseline"]
        rows += [(f"onnxruntime quantize_static ({b['method']}): accuracy (%)", f"{b['accuracy']:.2f}"),
                 ("onnxruntime quantize_static: logit SQNR (dB)", f"{b['sqnr_db']:.1f}"),
                 ("ours - onnxruntime: SQNR (dB)", f"{b['ours_minus_baseline']['sqnr_db']:+.1f}")]
    return [*rows, ("gate", gate)]
