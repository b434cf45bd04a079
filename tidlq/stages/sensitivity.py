"""Stage sensitivity: which quantized layers hurt the model most, and which ONNX tensors to give TIDL in 16 bits.

For every quantized Conv/Linear module (FX graph order) it reports:
- `layer_sqnr_db`: SQNR of the layer's int8 output in the QDQ model in onnxruntime (the output of its fused ReLU/Clip,
  after the last Q/DQ: what its consumers read) against the same tensor of the float graph (the QDQ graph with float
  weights, BN folded, and every Q/DQ passed through: the float model) on the same val images. The error builds up
  along the network, so a fragile layer's successors score low too; the ranking uses the float-only gain.
- `float_only`: accuracy and logit SQNR (against the float model's logits) of the QDQ model with only that layer in
  float, and `sqnr_gain_db` over the fully quantized model. Ranked by that gain (ties: layer SQNR ascending).
How the layers are found in the QDQ model and left in float, and what was rejected: `tidlq.eval.qdq_layers`.
Caveat: TI documents pre-quantized QDQ models as 8-bit only (tidl.md §2), so with `prequantized_model: 1` TIDL may
ignore the 16-bit list; it applies when TIDL calibrates.

Outputs: `sensitivity.json` (every layer, the `top_k` worst, and `for_16bit`: those of them whose float version gains at
least `min_gain_db`) and `sensitivity.png`. The recipe comes from prepared.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from matplotlib.figure import Figure

from tidlq.core import files
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.eval.qdq_layers import Layer, find_layers, layer_sqnrs, onnx_logits, with_float_layer
from tidlq.models import networks, training
from tidlq.quant import fx

if TYPE_CHECKING:
    from tidlq.core.params import SensitivityParams

MAX_DB = 200.0  # SQNR of identical tensors (infinite) is written as this (and of a silent one as its negative)


def run(sensitivity: SensitivityParams, prepared_dir: Path, model_dir: Path, data_dir: Path, qdq_dir: Path,
        out: Path) -> dict:
    """Rank the quantized layers by what leaving each one in float gains; write sensitivity.json and .png."""
    top_k = sensitivity.top_k
    x, y = (a[:sensitivity.images] for a in load_split(data_dir, "val"))
    qdq = onnx.load(Path(qdq_dir) / "model_qdq.onnx")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    with fx.quantized_engine(info["engine"]):
        prepared = fx.load_prepared(model_dir, prepared_dir)
        layers, order_agrees = find_layers(qdq, prepared, fx.convert(prepared))
    float_logits = training.predict(networks.load(model_dir), x)
    quantized = score(onnx_logits(qdq, x), float_logits, y)
    layer_db = {name: _db(db) for name, db in layer_sqnrs(qdq, layers, x).items()}
    rows = rank([layer_row(qdq, layer, layer_db[layer.name], quantized, float_logits, x, y) for layer in layers])
    worst = [row["onnx_output"] for row in rows[:top_k]]
    for_16bit = [row["onnx_output"] for row in rows[:top_k] if row["sqnr_gain_db"] >= sensitivity.min_gain_db]
    result = {"layers": rows, "worst": worst, "for_16bit": for_16bit, "quantized": quantized,
              "images": int(len(y)), "qconfig": info["qconfig"], "mode": info["mode"],
              "onnx_order_agrees": order_agrees}
    plot(rows, quantized, top_k, out / "sensitivity.png")
    files.write_json(out / "sensitivity.json", result)
    return {"worst": worst, "for_16bit": for_16bit, "quantized": quantized, "images": int(len(y)),
            "layers": len(rows)}


def layer_row(model: onnx.ModelProto, layer: Layer, layer_db: float, quantized: dict, float_logits: np.ndarray,
              x: np.ndarray, y: np.ndarray) -> dict:
    """One layer's entry: its names, its own SQNR, and the whole model with only this layer in float."""
    only = score(onnx_logits(with_float_layer(model, layer), x), float_logits, y)
    return {"layer": layer.name, "onnx_node": layer.node, "onnx_output": layer.onnx_output,
            "layer_sqnr_db": layer_db, "float_only": only,
            "sqnr_gain_db": round(only["sqnr_db"] - quantized["sqnr_db"], 3)}


def score(logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (percent) and logit SQNR (dB, against the float logits), rounded for stable JSON."""
    return {"accuracy": round(training.accuracy(logits, labels), 3),
            "sqnr_db": _db(metrics.sqnr_db(float_logits, logits))}


def rank(rows: list[dict]) -> list[dict]:
    """Worst first: the largest whole-model SQNR gain when left in float; ties by layer SQNR, lowest first."""
    return sorted(rows, key=lambda r: (-r["sqnr_gain_db"], r["layer_sqnr_db"]))


def plot(rows: list[dict], quantized: dict, top_k: int, path: Path) -> None:
    """Horizontal bars of each layer's SQNR gain, worst at the top, the `top_k` highlighted."""
    fig = Figure(figsize=(7, max(3.0, 0.3 * len(rows) + 1.2)))
    ax = fig.add_subplot()
    labels = [f"{r['layer']}  ({r['onnx_output']})" for r in rows]
    colors = ["#c44e52" if i < top_k else "#4c72b0" for i in range(len(rows))]
    ax.barh(labels, [r["sqnr_gain_db"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("logit SQNR gain with only this layer in float (dB)")
    ax.set_title(f"int8: {quantized['accuracy']:.1f} %, {quantized['sqnr_db']:.1f} dB; red: top {top_k}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _db(value: float) -> float:
    return round(float(np.clip(value, -MAX_DB, MAX_DB)), 3)
