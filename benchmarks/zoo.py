"""Our PTQ against onnxruntime's quantize_static on architectures this project did not write (`zoo_models.py`:
torchvision's definitions), on a harder variant of the bundled digits.

The data: every digit three times, 3 channels, resized to a random 16-28 px and placed at a random spot of a 32x32
canvas, random dark background colour, a brighter random foreground colour, Gaussian noise (sigma 0.2), seeded.
Written to `outputs/zoo/hard_digits.npz`; tidlq reads it as `data.source` (image_size 32).

Per model (each in its own process, so that its peak memory is its own): the float model is trained here (SGD,
cosine, the epochs and learning rate of `zoo_models.ZOO`; BatchNorm statistics re-estimated over the train split
after training, as a user exporting a torchvision model would: MobileNetV3's momentum of 0.01 leaves them far off)
and saved as a state_dict, which tidlq then takes as `model.weights`. Then `peer_baseline.compare_model`: the
default recipe, onnxruntime's best method on the same float ONNX model and the same calibration images, the
autopilot's grid, and the default recipe
on tda4vm (power-of-2). Prints the table and writes benchmarks/results/zoo.json.

    make zoo-deps                     # torchvision's model definitions (--no-deps; benchmarks only)
    .venv/bin/python benchmarks/zoo.py [--models resnet18 mobilenet_v3_small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import zoo_models  # noqa: E402 - benchmarks/ is not a package

WORK = ROOT / "outputs" / "zoo"
IMAGE_SIZE = 32


def hard_digits(seed: int = 0, copies: int = 3, canvas: int = 32, noise: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """The harder digits: uint8 NCHW images (3 channels) and labels (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(digits.images / 16.0).float()[:, None]
    out, labels = [], []
    for _ in range(copies):
        for image, label in zip(images, digits.target, strict=True):
            size = int(rng.integers(16, 29))
            digit = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
            y0, x0 = rng.integers(0, canvas - size + 1, size=2)
            mask = np.zeros((canvas, canvas), np.float32)
            mask[y0:y0 + size, x0:x0 + size] = digit
            background = rng.uniform(0, 0.5, 3)
            foreground = background + rng.uniform(0.3, 0.5, 3)
            img = background[:, None, None] * (1 - mask) + foreground[:, None, None] * mask
            out.append(np.clip(img + rng.normal(0, noise, img.shape), 0, 1))
            labels.append(int(label))
    return (np.stack(out) * 255).round().astype(np.uint8), np.asarray(labels, dtype=np.int64)


def params_for(name: str, weights: Path | None):
    from tidlq.core.params import load_params

    overrides = {"data.source": str(WORK / "hard_digits.npz"), "data.image_size": IMAGE_SIZE,
                 "model.source": f"zoo_models:{name}", "model.kwargs": {"num_classes": 10}, "model.name": name}
    if weights is not None:
        overrides["model.weights"] = str(weights)
    return load_params(None, overrides)


def train_weights(name: str, data: Path) -> Path:
    """Train a zoo model on the train split and re-estimate its BatchNorm statistics; its state_dict file."""
    import torch

    from tidlq.data.dataset import load_split
    from tidlq.models import training

    epochs, lr = zoo_models.ZOO[name][3]
    weights = WORK / f"{name}-e{epochs}-lr{lr:g}.pt"
    if weights.exists():
        return weights
    torch.manual_seed(0)
    net = zoo_models.build(name)
    x, y = load_split(data, "train")
    training.train(net, x, y, training.Schedule(epochs, 64, lr, 0.9, 1e-4, 0), label=f"{name} float training")
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the passes below
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 128):
            net(torch.from_numpy(x[i:i + 128]))
    torch.save(net.eval().state_dict(), weights.with_suffix(".tmp"))
    os.replace(weights.with_suffix(".tmp"), weights)
    return weights


def one(name: str) -> dict:
    """Everything for one model, in this process: its row of the table."""
    import peer_baseline

    from tidlq.stages.prepare_data import run as prepare

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"tidlq-zoo-{name}-") as tmp:
        data = peer_baseline.stage(Path(tmp), "data", lambda o: prepare(params_for(name, None).data, o))
        weights = train_weights(name, data)
        trained = time.perf_counter()
        folder = Path(tmp) / name
        folder.mkdir()
        row = peer_baseline.compare_model(params_for(name, weights), data, folder)
    return row | {"brings": zoo_models.ZOO[name][2], "train_seconds": round(trained - started, 1),
                  "quantize_seconds": round(time.perf_counter() - trained, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(zoo_models.ZOO), choices=list(zoo_models.ZOO))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its row as JSON
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("ZOO-ROW " + json.dumps(one(args.one)))
        return
    x, y = hard_digits()
    np.savez(WORK / "hard_digits.tmp.npz", x=x, y=y)
    os.replace(WORK / "hard_digits.tmp.npz", WORK / "hard_digits.npz")
    rows, failures = [], {}
    for name in args.models:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              check=False)
        line = next((s for s in done.stdout.splitlines() if s.startswith("ZOO-ROW ")), None)
        if line is None:  # e.g. the float check refused a model that did not learn: reported, the others go on
            failures[name] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            print(f"{name} failed: {failures[name]}", file=sys.stderr)
            continue
        rows.append(json.loads(line.removeprefix("ZOO-ROW ")))
        print_rows(rows)
    from tidlq.core import files

    files.write_json(HERE / "results" / "zoo.json", {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "training": {name: zoo_models.ZOO[name][3] for name in args.models}, "image_size": IMAGE_SIZE,
        "models": rows, "failures": failures})


def print_rows(rows: list[dict]) -> None:
    """Float, ours (default, autopilot, tda4vm), onnxruntime's best, the gap, time and memory per model."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zoo: our PTQ vs onnxruntime quantize_static (hard digits, 32x32, same calibration images)")
    for col in ("model", "float %", "ours SQNR dB", "ours drop", "auto SQNR dB", "auto pick", "ORT best",
                "ORT SQNR dB", "ORT drop", "ours - ORT dB", "tda4vm drop", "train s", "quantize s", "peak MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        o, b, a = r["ours"], r["ort"], r["autopilot"]
        win = next(c for c in a["candidates"] if c["label"] == a["winner"])
        table.add_row(r["model"], f"{r['float_accuracy']:.2f}", f"{o['sqnr_db']:.1f}", f"{o['accuracy_drop']:.2f}",
                      f"{win['sqnr_db']:.1f}", a["winner"], r["ort_best"], f"{b['sqnr_db']:.1f}",
                      f"{b['accuracy_drop']:.2f}", f"{o['sqnr_db'] - b['sqnr_db']:+.1f}",
                      f"{r['tda4vm']['accuracy_drop']:.2f}", f"{r['train_seconds']:.0f}",
                      f"{r['quantize_seconds']:.0f}", str(r["peak_rss_mib"]))
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
