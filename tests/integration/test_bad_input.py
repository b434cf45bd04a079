"""Bad input, end to end: every malformed params field, data file, model, weights file, ONNX file, output folder and
S3 URI ends the real `tidlq` command (`run`, or `stage <name>` where one stage is the subject) with exit code 2, a
message that names the problem, no traceback, and nothing half-written (no temporary files, every stage folder whole
and matching its manifest)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pickle
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import PROJECT_ROOT
from tidlq import runner
from tidlq.core import cache, files
from tidlq.core.params import load_params
from tidlq.models.builtin import MobileNetV2Tiny, ResNetTiny

pytestmark = pytest.mark.slow
TIDLQ = str(Path(sys.executable).with_name("tidlq"))
# Tiny but complete: digits at 16x16, one epoch, no baseline or sensitivity stage.
BASE: dict[str, dict[str, Any]] = {
    "data": {"image_size": 16},
    "float_train": {"epochs": 1},
    "quant": {"calibration_batches": 2},
    # one epoch leaves the model near chance: the float check is off except in the case about it
    "verify": {"baseline": "none", "max_accuracy_drop": 100.0, "min_sqnr_db": -100.0, "min_float_accuracy": 0},
    "sensitivity": {"enabled": False},
}
BUILT_STAGES = ("prepare_data", "float_model", "evaluate_float", "calibrate", "convert", "export_qdq")


@dataclass
class Ctx:
    """What a case's setup may use and change: its folder, extra environment, code run in the child before exec."""

    tmp: Path
    request: pytest.FixtureRequest
    cleanup: contextlib.ExitStack
    env: dict[str, str] = field(default_factory=dict)
    preexec: list[Callable[[], None]] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)  # input stage folders a case breaks on purpose

    def copy_built(self, *stages: str) -> None:
        """Copy stage folders of the module's prebuilt pipeline into this case's pipeline/."""
        if not stages:
            return
        built: Path = self.request.getfixturevalue("built")
        for name in stages:
            shutil.copytree(built / name, self.tmp / "pipeline" / name)


@dataclass(frozen=True)
class Case:
    """One bad input: the command, how to make the input, and the text the message must contain."""

    message: str
    sets: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Ctx], dict[str, Any] | None] | None = None
    command: tuple[str, ...] = ("run",)
    params_text: str | None = None  # the params file as given, instead of BASE
    prebuilt: tuple[str, ...] = ()  # stage folders copied into pipeline/ first (for `tidlq stage`)
    flow: bool = False  # `tidlq run` gets as far as the flow: it talks to the session's Prefect server


# ---------------------------------------------------------------- inputs


def npz(**arrays: np.ndarray) -> Callable[[Ctx], dict[str, Any]]:
    def write(ctx: Ctx) -> dict[str, Any]:
        path = ctx.tmp / "data.npz"
        np.savez(path, **arrays)
        return {"data.source": path}
    return write


def images(n: int = 30, classes: int = 3, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n) % classes


X, Y = images()


def with_nan(x: np.ndarray, value: float) -> np.ndarray:
    out = x.astype(np.float32) / 255
    out[3, 2, 2] = value
    return out


def data_file(name: str, content: bytes) -> Callable[[Ctx], dict[str, Any]]:
    def write(ctx: Ctx) -> dict[str, Any]:
        (ctx.tmp / name).write_bytes(content)
        return {"data.source": ctx.tmp / name}
    return write


def image_folder(bad: str | None = None, suffix: str = ".png") -> Callable[[Ctx], dict[str, Any]]:
    """Two classes of five images each; `bad` adds a corrupt image ('garbage' or 'truncated') to class b."""
    from PIL import Image

    def write(ctx: Ctx) -> dict[str, Any]:
        root = ctx.tmp / "images"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for i in range(5):
                if suffix == ".png":
                    Image.fromarray(X[i]).save(root / label / f"{i}.png")
                else:
                    (root / label / f"{i}{suffix}").write_text("not an image")
        if bad:
            png = (root / "a" / "0.png").read_bytes()
            (root / "b" / "broken.png").write_bytes(png[:60] if bad == "truncated" else b"\x89PNG garbage")
        return {"data.source": root}
    return write


def weights(make: Callable[[], Any], *, truncate: bool = False, raw_pickle: bool = False) -> Callable[[Ctx], dict]:
    def write(ctx: Ctx) -> dict[str, Any]:
        path = ctx.tmp / "weights.pt"
        if raw_pickle:
            path.write_bytes(pickle.dumps(make()))
        else:
            torch.save(make(), path)
        if truncate:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return {"model.weights": path}
    return write


def seeded(make: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The state_dict of a freshly initialised model (seeded): what a user's untrained or broken weights look like."""
    torch.manual_seed(0)
    return make().state_dict()


def broken_module(ctx: Ctx) -> dict[str, Any]:
    """A user package that raises while being imported."""
    pkg = ctx.tmp / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\nraise RuntimeError('userpkg.nets needs a GPU')\n")
    ctx.env["PYTHONPATH"] = f"{PROJECT_ROOT}{os.pathsep}{ctx.tmp}"
    return {"model.source": "userpkg.nets:build"}


def corrupt_onnx(rewrite_manifest: bool) -> Callable[[Ctx], None]:
    """Overwrite the exported QDQ model with garbage; optionally make its manifest agree (as a bad copy would)."""
    def write(ctx: Ctx) -> None:
        folder = ctx.tmp / "pipeline" / "export_qdq"
        onnx_file = folder / "model_qdq.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes()[:200] + b"\x00garbage" * 64)
        if rewrite_manifest:
            manifest = files.read_json(folder / cache.MANIFEST)
            manifest["files"]["model_qdq.onnx"] = files.sha256_file(onnx_file)
            files.write_json(folder / cache.MANIFEST, manifest)
        else:
            ctx.damaged.add("export_qdq")
    return write


def s3_object(field_name: str) -> Callable[[Ctx], dict[str, Any]]:
    """A URI to an object that is not in the local stack's (real SeaweedFS) bucket."""
    def write(ctx: Ctx) -> dict[str, Any]:
        _, env = ctx.request.getfixturevalue("stack")
        ctx.env |= {k: v for k, v in env.items() if k.startswith("AWS_")} | {"TIDLQ_CACHE_DIR": str(ctx.tmp / "dl")}
        return {field_name: f"s3://{env['TIDLQ_S3_BUCKET']}/missing/{uuid.uuid4().hex}/input.npz"}
    return write


# ---------------------------------------------------------------- output folders


def _mount_tmpfs(ctx: Ctx, where: Path, options: str) -> None:
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tidlq-test", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the file-size-limit case "
                    "covers a failing write")
    ctx.cleanup.callback(subprocess.run, ["umount", "-l", str(where)], check=False)


def full_disk(folder: str) -> Callable[[Ctx], dict[str, Any]]:
    """`folder` (output_dir `out`, or `pipeline` of `tidlq stage`) on a 1 MiB tmpfs: the dataset (1.8 MB) does not
    fit."""
    def make(ctx: Ctx) -> dict[str, Any]:
        _mount_tmpfs(ctx, ctx.tmp / folder, "size=1m")
        return {}
    return make


def read_only(folder: str) -> Callable[[Ctx], dict[str, Any]]:
    """`folder` on a read-only tmpfs."""
    def make(ctx: Ctx) -> dict[str, Any]:
        _mount_tmpfs(ctx, ctx.tmp / folder, "ro,size=1m")
        return {}
    return make


def file_size_limit(ctx: Ctx) -> dict[str, Any]:
    """RLIMIT_FSIZE of 8 MiB in the child: writing the 29 MB dataset fails with EFBIG (Python ignores SIGXFSZ)."""
    limit = 8 << 20
    ctx.preexec.append(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    return {"data.image_size": 64}


_PR_CAPBSET_DROP, _DAC_CAPS = 24, (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def _drop_dac_capabilities() -> None:
    """In the child before exec: without these, root too must obey file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _obey_permissions(ctx: Ctx) -> None:
    """As root, run the child without the capabilities that bypass file permissions."""
    if os.geteuid() == 0:
        try:
            subprocess.run(["true"], preexec_fn=_drop_dac_capabilities, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE for the child ({exc})")
        ctx.preexec.append(_drop_dac_capabilities)


def unwritable(folder: str) -> Callable[[Ctx], dict[str, Any]]:
    """`folder` (output_dir `out`, or `pipeline` of `tidlq stage`) with mode 0o500."""
    def make(ctx: Ctx) -> dict[str, Any]:
        path = ctx.tmp / folder
        path.mkdir()
        path.chmod(0o500)
        ctx.cleanup.callback(path.chmod, 0o700)
        _obey_permissions(ctx)
        return {}
    return make


def unreadable_npz(ctx: Ctx) -> dict[str, Any]:
    """A good .npz that the user may not read (mode 0o000)."""
    overrides = npz(x=X, y=Y)(ctx)
    overrides["data.source"].chmod(0)
    _obey_permissions(ctx)
    return overrides


# ---------------------------------------------------------------- the table

MODEL_STAGE = ("stage", "float_model")
DATA_STAGE = ("stage", "prepare_data")
FIXTURES = "tests.fixture_models"

CASES: dict[str, Case] = {
    # params: types, ranges, unknown keys, malformed files (all fail before Prefect starts)
    "params-type": Case("data.image_size: Input should be a valid integer", {"data.image_size": "huge"}),
    "params-range": Case("export.opset: Input should be less than or equal to 19", {"export.opset": 21}),
    "params-choice": Case("quant.mode: Input should be 'ptq', 'qat' or 'auto'", {"quant.mode": "qta"}),
    "params-nan": Case("verify.min_sqnr_db: Input should be a finite number", {"verify.min_sqnr_db": ".nan"}),
    "params-unknown-key-set": Case("unknown key 'quant.moed'; did you mean 'quant.mode'?", {"quant.moed": "qat"}),
    "params-unknown-key-file": Case("params.yaml: unknown key 'quant.calibration_batchs'; did you mean",
                                    params_text="quant:\n  calibration_batchs: 3\n"),
    "params-unknown-section": Case("unknown key 'qunat'", params_text="qunat:\n  mode: qat\n"),
    "params-section-not-mapping": Case("params.yaml: data: Input should be a valid dictionary",
                                       params_text="data: 5\n"),
    "params-kwargs-not-mapping": Case("model.kwargs: Input should be a valid dictionary", {"model.kwargs": "[1, 2]"}),
    "params-not-a-mapping": Case("expected a mapping of sections", params_text="- data\n- model\n"),
    "params-bad-yaml": Case("params.yaml: not valid YAML", params_text="data: [1, 2\n"),
    "params-binary-file": Case("params.yaml: not a UTF-8 text file", params_text="\udcff\udcfe\x00"),
    "params-empty-source": Case("data.source: String should have at least 1 character", {"data.source": "''"}),
    "params-seed-range": Case("data.seed: Input should be greater than or equal to 0", {"data.seed": -1}),
    "params-impossible-date": Case("params.yaml: not valid YAML (ValueError: month must be in 1..12)",
                                   params_text="data:\n  seed: 2001-13-45\n"),
    "params-recursive-alias": Case("params.yaml: a YAML alias refers to the anchor that contains it",
                                   params_text="model:\n  kwargs: &a\n    x: *a\n"),
    "params-set-syntax": Case("expected KEY=VALUE", {"quant.mode": None}),
    "params-set-into-value": Case("override 'output_dir.x': 'output_dir' is a value, not a section",
                                  {"output_dir.x": 1}),
    "stage-unknown": Case("unknown stage 'calibrat'", command=("stage", "calibrat")),
    # data files
    "data-missing": Case("data.source '/no/such/folder' does not exist", {"data.source": "/no/such/folder"},
                         command=DATA_STAGE),
    "data-unreadable": Case("data.source '{tmp}/data.npz' cannot be read: Permission denied", setup=unreadable_npz,
                            command=DATA_STAGE),
    "data-not-npz": Case("is neither a folder nor an .npz file", setup=data_file("data.csv", b"1,2,3\n"),
                         command=DATA_STAGE),
    "npz-corrupt": Case("cannot be read as .npz", setup=data_file("data.npz", b"PK\x03\x04 not a zip"),
                        command=DATA_STAGE),
    "npz-missing-array": Case("has no array y (it has: x)", setup=npz(x=X), command=DATA_STAGE),
    "npz-wrong-shape": Case("x has shape (30, 64); expected (N,H,W)", setup=npz(x=X.reshape(30, 64), y=Y),
                            command=DATA_STAGE),
    "npz-label-count": Case("y has shape (29,); expected (30,)", setup=npz(x=X, y=Y[:29]), command=DATA_STAGE),
    "npz-empty": Case("x holds no images", setup=npz(x=X[:0], y=Y[:0]), command=DATA_STAGE),
    "npz-object-array": Case("cannot be read as .npz", setup=npz(x=np.array([X, "a"], dtype=object), y=Y),
                             command=DATA_STAGE),
    "npz-nan": Case("the images contain NaN or infinite values", setup=npz(x=with_nan(X, np.nan), y=Y),
                    command=DATA_STAGE),
    "npz-inf": Case("the images contain NaN or infinite values", setup=npz(x=with_nan(X, np.inf), y=Y),
                    command=DATA_STAGE),
    "labels-negative": Case("y has negative labels (-1)", setup=npz(x=X, y=np.where(Y == 2, -1, Y)),
                            command=DATA_STAGE),
    "labels-not-integers": Case("y has dtype float64; labels must be integers", setup=npz(x=X, y=Y + 0.5),
                                command=DATA_STAGE),
    "labels-beyond-model-classes": Case(
        "returns shape (1, 3) but the data has 12 classes", {"model.source": f"{FIXTURES}:tiny",
                                                             "model.kwargs": "{num_classes: 3}"},
        setup=npz(x=np.concatenate([X, X[:3]]), y=np.concatenate([Y, [11, 11, 11]])), flow=True),
    "folder-no-images": Case("no images (.bmp", setup=image_folder(suffix=".txt"), command=DATA_STAGE),
    "folder-corrupt-image": Case("broken.png' cannot be read", setup=image_folder(bad="garbage"), command=DATA_STAGE),
    "folder-truncated-image": Case("broken.png' cannot be read", setup=image_folder(bad="truncated"),
                                   command=DATA_STAGE),
    # models
    "model-import-error": Case("module 'no_such_pkg.nets' cannot be imported",
                               {"model.source": "no_such_pkg.nets:build"}, command=MODEL_STAGE,
                               prebuilt=("prepare_data",)),
    "model-raises-on-import": Case("model.source 'userpkg.nets:build': module 'userpkg.nets' cannot be imported "
                                   "(RuntimeError: userpkg.nets needs a GPU)", setup=broken_module,
                                   command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "model-not-a-module": Case("returned a str, not a torch.nn.Module", {"model.source": f"{FIXTURES}:not_a_module"},
                               command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "model-bad-kwargs": Case("model.source 'tests.fixture_models:tiny' cannot be built with model.kwargs "
                             "{'bogus': 1}", {"model.source": f"{FIXTURES}:tiny", "model.kwargs": "{bogus: 1}"},
                             command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "model-returns-tuple": Case("returns a tuple; tidlq needs one tensor of logits",
                                {"model.source": f"{FIXTURES}:tuple_out"}, flow=True),
    "model-untraceable": Case("cannot be traced by torch.fx in submodule 'gate'",
                              {"model.source": f"{FIXTURES}:branchy"}, command=MODEL_STAGE,
                              prebuilt=("prepare_data",)),
    "model-rejects-input": Case("rejects an input of shape (1, 1, 16, 16)", {"model.source": f"{FIXTURES}:flat_mlp"},
                                command=MODEL_STAGE, prebuilt=("prepare_data",)),
    # weights files
    "weights-missing": Case("model.weights '/no/weights.pt' does not exist", {"model.weights": "/no/weights.pt"},
                            command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "weights-truncated": Case("cannot be loaded as a tensor-only state_dict",
                              setup=weights(lambda: MobileNetV2Tiny().state_dict(), truncate=True),
                              command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "weights-tensor": Case("is not a state_dict (a mapping of names to tensors)", setup=weights(lambda: torch.ones(3)),
                           command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "weights-list": Case("is not a state_dict (a mapping of names to tensors)",
                         setup=weights(lambda: [torch.ones(3)]), command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "weights-arbitrary-pickle": Case("cannot be loaded as a tensor-only state_dict",
                                     setup=weights(lambda: argparse.Namespace(lr=0.1), raw_pickle=True),
                                     command=MODEL_STAGE, prebuilt=("prepare_data",)),
    "weights-other-architecture": Case("does not match the model: missing keys",
                                       setup=weights(lambda: ResNetTiny().state_dict()), command=MODEL_STAGE,
                                       prebuilt=("prepare_data",)),
    # a float model that predicts nothing (random weights: 10 % on digits) stops before any quantization
    "float-at-chance": Case("reaches only", {"verify.min_float_accuracy": 19},
                            setup=weights(lambda: seeded(MobileNetV2Tiny)), flow=True),
    # the exported ONNX model given to verify_onnx
    "onnx-corrupt": Case("stage verify_onnx needs pipeline/export_qdq/, made by stage export_qdq, and it is missing "
                         "or damaged", setup=corrupt_onnx(rewrite_manifest=False), command=("stage", "verify_onnx"),
                         prebuilt=BUILT_STAGES),
    "onnx-unloadable": Case("model_qdq.onnx cannot be loaded by onnxruntime", setup=corrupt_onnx(rewrite_manifest=True),
                            command=("stage", "verify_onnx"), prebuilt=BUILT_STAGES),
    # the output folder
    "output-unwritable": Case("(Permission denied): Make it writable, or set output_dir to another folder",
                              setup=unwritable("out"), flow=True),
    "output-disk-full": Case("(No space left on device): Free disk space, or set output_dir", setup=full_disk("out"),
                             flow=True),
    "stage-unwritable": Case("(Permission denied): Make it writable, or run tidlq stage from a folder where "
                             "pipeline/ can be written", setup=unwritable("pipeline"), command=DATA_STAGE),
    "stage-read-only-fs": Case("(Read-only file system): Run tidlq stage from a folder where pipeline/ can be "
                               "written, on a writable file system", setup=read_only("pipeline"), command=DATA_STAGE),
    "stage-file-size-limit": Case("cannot write under 'pipeline' (File too large): The file is larger than this "
                                  "process may write", setup=file_size_limit, command=DATA_STAGE),
    # s3:// inputs (the session's local stack: real SeaweedFS)
    "s3-data-missing": Case("does not exist at http://127.0.0.1", setup=s3_object("data.source"), flow=True),
    "s3-weights-missing": Case("does not exist at http://127.0.0.1", setup=s3_object("model.weights"),
                               command=MODEL_STAGE, prebuilt=("prepare_data",)),
}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pipeline/` with BASE built up to export_qdq, in this process (what `tidlq stage` would build), once."""
    root = tmp_path_factory.mktemp("built") / "pipeline"
    p = load_params(None, dotted(BASE))
    for name in BUILT_STAGES:
        runner.build_in_pipeline(name, p, root)
    return root


def dotted(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in sections.items() for k, v in values.items()}


def set_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", key if value is None else f"{key}={value}"]
    return args


def stage_folders(root: Path) -> Iterator[Path]:
    """The flow's `.stages/<stage>/<key>/` folders and `tidlq stage`'s `pipeline/<stage>/` folders under `root` (lock
    files and hidden temporary folders beside them are not stage folders)."""
    parents = sorted((root / ".stages").glob("*")) if root.name != "pipeline" else [root]
    for parent in parents:
        yield from sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_nothing_half_written(root: Path, damaged: set[str]) -> None:
    """No temporary or displaced file anywhere under `root`; every stage folder holds exactly the files its manifest
    lists, with the digests it lists (`damaged`: input folders a case broke on purpose)."""
    if not root.exists():
        return
    stray = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert stray == [], f"left behind: {stray}"
    for folder in stage_folders(root):
        if folder.name in damaged:
            continue
        manifest = cache.load_intact(folder)
        assert manifest is not None, f"{folder} has no intact manifest"
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {cache.MANIFEST}
        assert on_disk == set(manifest.files), f"{folder}: files differ from its manifest"


def write_params(ctx: Ctx, case: Case) -> Path:
    path = ctx.tmp / "params.yaml"
    if case.params_text is None:
        path.write_text(yaml.safe_dump(BASE | {"output_dir": str(ctx.tmp / "out")}, sort_keys=False))
    else:
        path.write_bytes(case.params_text.encode("utf-8", "surrogateescape"))
    return path


def tidlq(ctx: Ctx, args: list[str], flow: bool) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "COLUMNS": "200"} | ctx.env
    if flow:  # one Prefect server for the session instead of a temporary one per command
        env["PREFECT_API_URL"] = ctx.request.getfixturevalue("prefect_api")
    preexec = (lambda: [fn() for fn in ctx.preexec]) if ctx.preexec else None
    return subprocess.run([TIDLQ, *args], env=env, cwd=ctx.tmp, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_bad_input_exits_2_naming_it_with_nothing_half_written(case: Case, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    with contextlib.ExitStack() as cleanup:
        ctx = Ctx(tmp_path, request, cleanup)
        ctx.copy_built(*case.prebuilt)
        overrides = dict(case.sets)
        if case.setup is not None:
            overrides |= case.setup(ctx) or {}
        args = [*case.command, "-p", str(write_params(ctx, case)), *set_args(overrides)]
        done = tidlq(ctx, args, case.flow)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-4000:]
        message = case.message.replace("{tmp}", str(tmp_path))
        assert "error: " in done.stderr and message in " ".join(done.stderr.split()), done.stderr[-4000:]
        assert "Traceback" not in output, output[-4000:]
        out = tmp_path / "out"
        if out.is_dir() and case.command[0] == "run":  # the published folder appears only when a run succeeds
            assert {p.name for p in out.iterdir()} <= {".stages"}
        assert_nothing_half_written(out, ctx.damaged)
        assert_nothing_half_written(tmp_path / "pipeline", ctx.damaged)
