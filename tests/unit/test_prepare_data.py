"""prepare_data: the three sources, a seeded stratified split, normalisation, digest, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.core.params import DataParams
from tidlq.data.dataset import load_split
from tidlq.stages.prepare_data import run


def build(tmp_path: Path, name: str = "out", **data) -> tuple[dict, Path]:
    out = tmp_path / name
    out.mkdir()
    return run(DataParams(**data), out), out


def test_digits_default_split_sizes_and_normalisation(tmp_path: Path) -> None:
    facts, out = build(tmp_path)
    assert facts["num_classes"] == 10
    assert facts["input_shape"] == [1, 1, 32, 32]
    assert facts["sizes"] == {"train": 1167, "calib": 270, "val": 360}
    assert sum(facts["sizes"].values()) == 1797
    x, y = load_split(out, "train")
    assert x.dtype == np.float32 and x.shape == (1167, 1, 32, 32)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    _, y_val = load_split(out, "val")
    assert np.all(np.bincount(y_val) >= 34)  # stratified: every digit well represented in val
    assert files.read_json(out / "data.json")["digest"] == facts["digest"]


def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    a, out_a = build(tmp_path, "a")
    b, out_b = build(tmp_path, "b")
    c, _ = build(tmp_path, "c", seed=1)
    assert a["digest"] == b["digest"] != c["digest"]
    assert files.sha256_file(out_a / "dataset.npz") == files.sha256_file(out_b / "dataset.npz")
    rows = [load_split(out_a, s)[0].reshape(-1, 1024) for s in ("train", "calib", "val")]
    seen = {r.tobytes() for r in rows[0]}
    # digits has a handful of exact duplicate images; the splits must not share more than those
    assert sum(r.tobytes() in seen for r in rows[2]) <= 3


def test_image_size_and_channels(tmp_path: Path) -> None:
    facts, out = build(tmp_path, image_size=16, channels=3)
    assert facts["input_shape"] == [1, 3, 16, 16]
    assert load_split(out, "val")[0].shape[1:] == (3, 16, 16)


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(60, 20, 20), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    facts, out = build(tmp_path, source=str(tmp_path / "d.npz"), image_size=16)
    assert facts["num_classes"] == 3
    assert facts["input_shape"] == [1, 1, 16, 16]
    assert facts["normalisation"]["scale_to_unit"] == pytest.approx(1 / 255)


def test_folder_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            img = (rng.random((12, 14, 3)) * 100 + c * 100).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / name / f"{i}.png")
    facts, out = build(tmp_path, source=str(tmp_path / "imgs"), image_size=8)
    assert facts["classes"] == ["cat", "dog"]
    assert facts["input_shape"] == [1, 3, 8, 8]
    assert sum(facts["sizes"].values()) == 20


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: np.savez(p / "bad.npz", images=np.zeros((4, 8, 8))), "has no array x or y"),
    (lambda p: (p / "bad.npz").write_bytes(b"not a zip"), "cannot be read as .npz"),
    (lambda p: np.savez(p / "bad.npz", x=np.full((30, 8, 8), np.nan), y=np.arange(30) % 3), "NaN or infinite"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((30, 8, 8)), y=np.arange(29) % 3), "one label per image"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((30, 8, 8)), y=np.arange(30) % 3 - 1), "negative labels"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((30, 8, 8)), y=np.arange(30) * 0.5), "must be integers"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((30, 5)), y=np.arange(30) % 3), "expected (N,H,W)"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((30, 8, 8)), y=np.zeros(30, dtype=int)), "at least 2"),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((31, 8, 8)), y=np.r_[np.arange(30) % 2, 2]), "fewer than 3"),
])
def test_bad_npz_is_a_clear_user_error(tmp_path: Path, make, message: str) -> None:
    make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as err:
        run(DataParams(source=str(tmp_path / "bad.npz"), image_size=8), out)
    assert message in str(err.value)
    assert "data.source" in str(err.value)
    assert list(out.iterdir()) == []


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(UserError, match="one sub-folder per class"):
        run(DataParams(source=str(tmp_path / "one")), tmp_path)
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir(parents=True)
    (tmp_path / "two" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="x.png.*cannot be read"):
        run(DataParams(source=str(tmp_path / "two")), tmp_path)
