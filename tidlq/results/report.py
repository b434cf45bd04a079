"""The human report of a run: `report.md` with plots (matplotlib, no display needed) for the MLflow UI and the
output folder: float vs int8 accuracy, the int8 model's confusion matrix, per-stage time, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tidlq.results.summary import metric_rows


def write(summary: dict[str, Any], verify: dict[str, Any], histories: dict[str, list[dict]], out: Path) -> list[str]:
    """Write report.md and its PNGs into `out`; return the file names written."""
    names = [_accuracy_plot(summary, out), _confusion_plot(verify, summary["model"], out),
             _stages_plot(summary["stages"], out)]
    if any(histories.values()):
        names.append(_training_plot(histories, out))
    if (out / "sensitivity.png").is_file():
        names.append("sensitivity.png")  # drawn by the sensitivity stage
    (out / "report.md").write_text(_markdown(summary, names))
    return ["report.md", *names]


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name


def _accuracy_plot(summary: dict, out: Path) -> str:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    labels = ["float", "int8 QDQ\n(onnxruntime)", f"int8 torch\n({summary['torch_int8']['engine']})"]
    values = [summary["float"]["accuracy"], summary["int8"]["accuracy"], summary["torch_int8"]["accuracy"]]
    bars = ax.bar(labels, values, color=["#4c72b0", "#55a868", "#c4c4c4"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(max(0.0, min(values) - 10), 100)
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(f"{summary['model']}: drop {summary['accuracy_drop']:.2f} points, "
                 f"SQNR {summary['int8']['sqnr_db']:.1f} dB", fontsize=10)
    return _save(fig, out / "accuracy.png")


def _confusion_plot(verify: dict, model: str, out: Path) -> str:
    matrix = np.asarray(verify["confusion_matrix"])
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted (int8 QDQ)")
    ax.set_ylabel("true")
    ax.set_title(f"{model}: int8 confusion matrix")
    return _save(fig, out / "confusion.png")


def _stages_plot(stages: dict[str, dict], out: Path) -> str:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    names = list(stages)
    seconds = [stages[n]["seconds"] for n in names]
    colors = ["#c4c4c4" if stages[n]["cached"] else "#4c72b0" for n in names]
    ax.barh(names, seconds, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("seconds in this run (grey: cached)")
    ax.set_title("per-stage time")
    return _save(fig, out / "stages.png")


def _training_plot(histories: dict[str, list[dict]], out: Path) -> str:
    fig = Figure(figsize=(6, 3.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for name, history in histories.items():
        if history:
            epochs = [h["epoch"] for h in history]
            loss_ax.plot(epochs, [h["loss"] for h in history], marker="o", label=name)
            key = "val_accuracy" if "val_accuracy" in history[0] else "train_accuracy"
            acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=f"{name} ({key.split('_')[0]})")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_ax.legend()
    acc_ax.legend()
    return _save(fig, out / "training.png")


def _markdown(summary: dict, images: list[str]) -> str:
    rows = metric_rows(summary)
    lines = [f"# {summary['model']}: {summary['mode']} / {summary['qconfig']} / {summary['target_device']}", "",
             "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += [f"- warning: {w}" for w in summary["warnings"]]
    if summary.get("sensitivity"):
        lines += ["", "## Layers that cost the most", "",
                  "| layer | ONNX output (TIDL name) | SQNR gain in float (dB) |", "|---|---|---|"]
        lines += [f"| {r['layer']} | `{r['onnx_output']}` | {r['sqnr_gain_db']:+.2f} |"
                  for r in summary["sensitivity"]["worst"]]
    if summary.get("autopilot"):
        choice = summary["autopilot"]
        lines += ["", "## Autopilot", "", choice["reason"], "", "| recipe | accuracy (%) | drop | SQNR (dB) | gate |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['label']}{' (winner)' if r['label'] == choice['winner'] else ''} | {r['accuracy']:.2f} | "
                  f"{r['accuracy_drop']:.2f} | {r['sqnr_db']:.1f} | {'passed' if r['gate_passed'] else 'failed'} |"
                  for r in choice["candidates"]]
    lines += ["", f"Dataset digest `{summary['dataset']['digest'][:16]}`, params digest "
              f"`{summary['params_digest'][:16]}`.", ""]
    lines += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"
