"""Our default PTQ (torch.ao FX, tidlq's default recipe) against onnxruntime's quantize_static, per built-in model.

For each built-in model on digits at the default params: prepare_data, float_model, evaluate_float, then our PTQ
(calibrate, convert, export_qdq, verify_onnx) and the baseline_ort stage, in a temporary folder, without the cache.
Both quantizers see the same float model and the same calibration images; both are scored in onnxruntime on the same
val split against the same torch float logits. Prints one row per model and writes
benchmarks/results/peer_baseline.json. Not a test: the numbers depend on the trained model (seeded) and the machine.

    .venv/bin/python benchmarks/peer_baseline.py
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

from tidlq import autopilot
from tidlq.core import files
from tidlq.core.params import BUILTIN_MODELS, Params, QuantParams, load_params
from tidlq.stages import baseline_ort, calibrate, convert, evaluate_float, export_qdq, float_model, verify_onnx
from tidlq.stages.prepare_data import run as prepare
from tidlq.tidl import lint

ROOT = Path(__file__).resolve().parents[1]


def stage(tmp: Path, name: str, work: Callable[[Path], dict]) -> Path:
    """Run one stage's pure `run` into a fresh folder `tmp/name`; the folder."""
    out = tmp / name
    out.mkdir()
    work(out)
    return out


def ptq(p: Params, quant: QuantParams, device: str, model: Path, data: Path, float_eval: Path,
        tmp: Path) -> tuple[Path, Path, dict]:
    """calibrate, convert, export_qdq, verify_onnx with one recipe for one device: (prepared, qdq, verify.json)."""
    tmp.mkdir(parents=True)
    prepared = stage(tmp, "prepared", lambda o: calibrate.run(quant, device, model, data, o))
    int8 = stage(tmp, "int8", lambda o: convert.run(prepared, model, data, o))
    qdq = stage(tmp, "qdq", lambda o: export_qdq.run(p.export, device, int8, prepared, model, o))
    verify = stage(tmp, "verify", lambda o: verify_onnx.run(p.verify, qdq, float_eval, int8, data, o))
    return prepared, qdq, files.read_json(verify / "verify.json")


def autopilot_result(p: Params, model: Path, data: Path, float_eval: Path, tmp: Path) -> dict:
    """The autopilot's grid for this model, and the recipe it keeps."""
    grid = autopilot.grid(p.quant, p.autopilot)
    results = [ptq(p, c.quant, p.tidl.target_device, model, data, float_eval, tmp / c.label)[2] for c in grid]
    return autopilot.choose(grid, results, grid[0].label)


def power_of_2_result(p: Params, model: Path, data: Path, float_eval: Path, tmp: Path) -> dict:
    """The default recipe for tda4vm: accuracy, and whether every scale is a power of two (the TIDL lint)."""
    _, qdq, v = ptq(p, p.quant, "tda4vm", model, data, float_eval, tmp)
    findings = lint.check(onnx.load(qdq / "model_qdq.onnx"), "tda4vm")
    return {"accuracy": v["int8"]["accuracy"], "accuracy_drop": v["accuracy_drop"], "sqnr_db": v["int8"]["sqnr_db"],
            "rejects": len([f for f in findings if f["severity"] == "reject"])}


def compare_model(p: Params, data: Path, tmp: Path) -> dict:
    """Float model, our PTQ and the onnxruntime baseline for `p.model`; the numbers of both side by side."""
    model = stage(tmp, "model", lambda o: float_model.run(p.model, p.float_train, data, o))
    float_eval = stage(tmp, "float",
                       lambda o: evaluate_float.run(p.export, p.verify.min_float_accuracy, model, data, o))
    prepared, _, v = ptq(p, p.quant, p.tidl.target_device, model, data, float_eval, tmp / "default")
    base = stage(tmp, "baseline", lambda o: baseline_ort.run(p.quant.batch_size, p.quant.calibration_batches,
                                                                  float_eval, data, o))
    b = files.read_json(base / "baseline.json")
    ours_images = files.read_json(prepared / "prepared.json")["calibration_images"]
    if ours_images != b["calibration_images"]:
        raise RuntimeError(f"calibration sets differ: ours {ours_images}, onnxruntime {b['calibration_images']}")
    ours = v["int8"] | {"accuracy_drop": v["accuracy_drop"]}
    ort = {k: b[k] for k in ("accuracy", "agreement", "sqnr_db", "accuracy_drop")}
    return {
        "model": p.model.display_name,
        "float_accuracy": v["float"]["accuracy"],
        "calibration_images": ours_images,
        "val_images": v["val_images"],
        "ours": ours,
        "ort_best": b["best"],
        "ort": ort,
        "ort_methods": b["methods"],
        "ours_sqnr_ge_ort": ours["sqnr_db"] >= ort["sqnr_db"],
        "ours_drop_le_ort": ours["accuracy_drop"] <= ort["accuracy_drop"],
        "autopilot": autopilot_result(p, model, data, float_eval, tmp / "autopilot"),
        "tda4vm": power_of_2_result(p, model, data, float_eval, tmp / "tda4vm"),
    }


def print_table(rows: list[dict], title: str) -> None:
    """One row per model: float, ours, onnxruntime's best, and whether ours is at least as good."""
    table = Table(title=title)
    for col in ("model", "float %", "ours %", "ours drop", "ours SQNR dB", "ours agree %", "ORT best", "ORT %",
                "ORT drop", "ORT SQNR dB", "ORT agree %", "SQNR ours≥ORT", "drop ours≤ORT"):
        table.add_column(col, justify="right")
    for r in rows:
        o, b = r["ours"], r["ort"]
        table.add_row(r["model"], f"{r['float_accuracy']:.2f}", f"{o['accuracy']:.2f}", f"{o['accuracy_drop']:.2f}",
                      f"{o['sqnr_db']:.1f}", f"{o['agreement']:.2f}", r["ort_best"], f"{b['accuracy']:.2f}",
                      f"{b['accuracy_drop']:.2f}", f"{b['sqnr_db']:.1f}", f"{b['agreement']:.2f}",
                      "yes" if r["ours_sqnr_ge_ort"] else "NO", "yes" if r["ours_drop_le_ort"] else "NO")
    console = Console()
    if not console.is_terminal:  # redirected to a file: do not squeeze 13 columns into 80 characters
        console = Console(width=200)
    console.print(table)
    more = Table(title="the autopilot's pick, and the default recipe on tda4vm (power-of-2 symmetric)")
    for col in ("model", "autopilot winner", "its SQNR dB", "its drop", "ours default SQNR dB", "tda4vm drop",
                "tda4vm SQNR dB", "tda4vm lint rejects"):
        more.add_column(col, justify="right")
    for r in rows:
        a, t = r["autopilot"], r["tda4vm"]
        win = next(c for c in a["candidates"] if c["label"] == a["winner"])
        more.add_row(r["model"], a["winner"], f"{win['sqnr_db']:.1f}", f"{win['accuracy_drop']:.2f}",
                     f"{r['ours']['sqnr_db']:.1f}", f"{t['accuracy_drop']:.2f}", f"{t['sqnr_db']:.1f}",
                     str(t["rejects"]))
    console.print(more)


def main() -> None:
    defaults = load_params(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tidlq-peer-baseline-") as tmp:
        data = stage(Path(tmp), "data", lambda o: prepare(defaults.data, o))
        for name in BUILTIN_MODELS:
            folder = Path(tmp) / name
            folder.mkdir()
            rows.append(compare_model(load_params(None, {"model.source": name}), data, folder))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "params": {"data": defaults.data.model_dump(), "float_train": defaults.float_train.model_dump(),
                   "quant": defaults.quant.model_dump(), "export": defaults.export.model_dump(),
                   "target_device": defaults.tidl.target_device},
        "ort_settings": baseline_ort.SETTINGS,
        "models": rows,
    }
    quant = defaults.quant
    recipe = f"{quant.qconfig} qconfig, {quant.observer} observer, {defaults.tidl.target_device}"
    print_table(rows, f"our PTQ ({recipe}) vs onnxruntime quantize_static on digits: "
                      f"{rows[0]['calibration_images']} calibration images, {rows[0]['val_images']} val images")
    out = ROOT / "benchmarks" / "results" / "peer_baseline.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
