"""Where images come from: scikit-learn's bundled digits, an .npz file, or a folder of class sub-folders; resized
and split (seeded, stratified) into train / calib / val. What prepare_data reads; no other stage depends on it."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tidlq.core import inputs
from tidlq.core.errors import UserError

if TYPE_CHECKING:
    from tidlq.core.params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def load_source(data: DataParams) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Images as float32 NCHW in [0, 1], integer labels, class names, and where they came from."""
    if data.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images[:, None, :, :] / 16.0).astype(np.float32)
        return x, digits.target.astype(np.int64), [str(c) for c in range(10)], \
            {"kind": "digits", "scale_to_unit": 1 / 16.0}
    path = inputs.resolve(data.source, "data.source")
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.is_dir():
        return _load_folder(path, data.image_size)
    if not path.exists():
        raise UserError(f"data.source {data.source!r} does not exist. Give 'digits', a folder of images in class "
                        "sub-folders, or an .npz file with arrays x and y.")
    raise UserError(f"data.source {data.source!r} is neither a folder nor an .npz file. Give 'digits', a folder of "
                    "images in class sub-folders, or an .npz file with arrays x and y.")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    where = f"data.source {str(path)!r}"
    if not path.is_file():
        raise UserError(f"{where} does not exist. Give the path of an .npz file with arrays x and y.")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise UserError(f"{where} has no array {' or '.join(missing)} (it has: {', '.join(z.files) or 'none'})."
                                " Save images as x (N,H,W), (N,C,H,W) or (N,H,W,C) and labels as y (N,).")
            x, y = z["x"], z["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{where} cannot be read as .npz ({exc}). Save it with numpy.savez(path, x=..., y=...).") \
            from None
    x = _to_nchw(x, where)
    if len(x) == 0:
        raise UserError(f"{where}: x holds no images (shape {x.shape}). Save at least 3 images per class.")
    scale = 1.0
    if x.dtype == np.uint8:
        scale = 1 / 255.0
    elif not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{where}: x has dtype {x.dtype}; use uint8 (0-255) or float images.")
    x = x.astype(np.float32) * scale
    y = _labels(y, len(x), where)
    classes = [str(c) for c in range(int(y.max()) + 1)] if len(y) else []
    return x, y, classes, {"kind": "npz", "scale_to_unit": scale}


def _load_folder(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    from PIL import Image, UnidentifiedImageError

    where = f"data.source {str(path)!r}"
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{where} needs one sub-folder per class (at least 2), found {len(classes)}. "
                        "Put each class's images in their own sub-folder.")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                images.append(np.asarray(rgb, dtype=np.float32))
            except (UnidentifiedImageError, OSError) as exc:
                raise UserError(f"{where}: image {str(file)!r} cannot be read ({exc}). Remove or replace it.") \
                    from None
            labels.append(label)
    if not images:
        raise UserError(f"{where}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class sub-folders.")
    x = np.stack(images).transpose(0, 3, 1, 2) / 255.0
    if np.allclose(x[:, 0], x[:, 1]) and np.allclose(x[:, 0], x[:, 2]):
        x = x[:, :1]
    return x, np.asarray(labels, dtype=np.int64), classes, {"kind": "folder", "scale_to_unit": 1 / 255.0}


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3):
            return x
        if x.shape[3] in (1, 3):
            return x.transpose(0, 3, 1, 2)
    raise UserError(f"{where}: x has shape {x.shape}; expected (N,H,W), (N,C,H,W) or (N,H,W,C) with C = 1 or 3.")


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{where}: y has shape {y.shape}; expected ({n},), one label per image in x.")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: y has dtype {y.dtype}; labels must be integers 0..num_classes-1.")
    if len(y) and y.min() < 0:
        raise UserError(f"{where}: y has negative labels ({int(y.min())}); labels must be 0..num_classes-1.")
    return y.astype(np.int64)


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of NCHW float images to size x size (no-op when already that size)."""
    if x.shape[2:] == (size, size):
        return x
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(size, size), mode="bilinear",
                         align_corners=False).numpy()


def split(y: np.ndarray, data: DataParams) -> dict[str, np.ndarray]:
    """Seeded stratified split of sample indices into train / calib / val."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if (counts > 0).sum() < 2:
        raise UserError(f"data.source {data.source!r}: found {(counts > 0).sum()} class; at least 2 are needed.")
    thin = [c for c, n in enumerate(counts) if 0 < n < 3]
    if thin:
        raise UserError(f"data.source {data.source!r}: class(es) {thin} have fewer than 3 images; each class needs "
                        "images in train, calib and val. Add images or remove those classes.")
    idx = np.arange(len(y))
    try:
        rest, val = train_test_split(idx, test_size=data.val_fraction, random_state=data.seed, stratify=y)
        calib_share = data.calib_fraction / (1 - data.val_fraction)
        train, calib = train_test_split(rest, test_size=calib_share, random_state=data.seed, stratify=y[rest])
    except ValueError as exc:
        raise UserError(f"data.source {data.source!r}: cannot split {len(y)} images into train / calib / val "
                        f"({exc}). Add images, or change data.val_fraction / data.calib_fraction.") from None
    return {"train": np.sort(train), "calib": np.sort(calib), "val": np.sort(val)}
