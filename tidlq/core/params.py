"""The one schema of params.yaml: loaded once, validated up front, one section per stage.

`load_params("params.yaml", {"quant.mode": "qat"})` returns a validated `Params`; any problem raises `UserError`
with a message that names the file and the field, and says what to do.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tidlq.core.errors import UserError
from tidlq.core.s3 import BUCKET_NAME

BUILTIN_MODELS = ("mobilenet_v2_tiny", "resnet_tiny")
TARGET_DEVICES = ("am62a", "am67a", "am68a", "am69a", "tda4vm", "am68pa")  # what each one needs: tidlq.tidl.devices
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][\w.-]*", re.ASCII)  # a file or key name: no "..", no "/"
UNECHOED_FIELDS = ("storage.endpoint_url",)  # a refused value may hold credentials: not repeated in errors


class Section(BaseModel):
    """A params section: unknown keys are errors, numbers are finite; a validated section cannot be changed afterwards.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(Section):
    """Where the images come from and how they are split."""

    source: str = Field("digits", min_length=1, description="'digits' (bundled with scikit-learn), a folder of class "
                        "sub-folders, or an .npz file with arrays x and y")
    image_size: int = Field(32, ge=8, le=1024, description="images are resized to image_size x image_size")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3; empty: taken from the source")
    val_fraction: float = Field(0.2, gt=0, lt=0.9)
    calib_fraction: float = Field(0.15, gt=0, lt=0.9)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (numpy and scikit-learn take 32 bits)")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataParams:
        if self.val_fraction + self.calib_fraction > 0.8:
            raise ValueError("val_fraction + calib_fraction must be at most 0.8 so that training data remains")
        return self


class ModelParams(Section):
    """Which float model to quantize."""

    source: str = Field("mobilenet_v2_tiny", description="a built-in name or package.module:callable")
    weights: str | None = Field(None, min_length=1, description="a state_dict file; empty: train the model on the "
                                "train split")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for a package.module:callable")
    name: str | None = Field(None, description="name used for outputs; empty: derived from source")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in BUILTIN_MODELS and not _IMPORT_PATH.fullmatch(v):
            raise ValueError(f"must be a built-in model ({', '.join(BUILTIN_MODELS)}) or an import path "
                             f"'package.module:callable', got {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not _SAFE_SEGMENT.fullmatch(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @property
    def display_name(self) -> str:
        """The model's name in outputs: `name`, or the built-in name, or the callable's name."""
        return self.name or self.source.rsplit(":", 1)[-1]


class FloatTrainParams(Section):
    """Float training of a model given without weights."""

    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (numpy and scikit-learn take 32 bits)")


class QuantParams(Section):
    """The quantization recipe shared by PTQ and QAT."""

    mode: Literal["ptq", "qat", "auto"] = Field("ptq", description="auto: try the autopilot's grid of PTQ recipes "
                                                "and keep the best; QAT when none passes the gate")
    qconfig: Literal["qnnpack", "x86", "tidl"] = Field("tidl", description="tidl: TI's WC8_AT8, power-of-2 "
                                                       "symmetric on tda4vm/am68pa; qnnpack; x86")
    observer: Literal["histogram", "minmax", "moving_average", "percentile"] = Field(
        "histogram", description="PTQ activation calibration; QAT always uses moving-average fake-quantization")
    percentile: float = Field(99.999, gt=50, le=100, description="percentile observer: the percentile of |x| "
                            "where the range is clipped (onnxruntime's and TensorRT's default 99.999)")
    bias_correction: bool = Field(False, description="PTQ: shift each Conv/Linear bias by the mean output error "
                              "between float and int8 on the calibration images")
    calibration_batches: int = Field(8, ge=1, description="PTQ: number of calib batches fed to the observers")
    batch_size: int = Field(32, ge=1)


class AutopilotParams(Section):
    """The PTQ recipes `quant.mode: auto` tries (every combination, plus the quant section's own recipe)."""

    presets: list[Literal["qnnpack", "x86", "tidl"]] = Field(default_factory=lambda: ["tidl"], min_length=1)
    observers: list[Literal["histogram", "minmax", "moving_average", "percentile"]] = Field(
        default_factory=lambda: ["histogram", "minmax", "percentile"], min_length=1)
    bias_correction: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    max_parallel: int = Field(1, ge=1, description="recipes whose stages run at once: their torch work takes turns on "
                              "one lock anyway, so more than 1 mostly adds memory (one model copy per recipe)")


class QatParams(Section):
    """Quantization-aware training (SGD, BN and observer freeze schedule)."""

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.002, gt=0, description="about 1-2 % of the float learning rate, as TI recommends")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    freeze_bn_epoch: int | None = Field(None, ge=0, description="epoch after which BN statistics freeze; "
                                        "empty: half of the epochs")
    freeze_observer_epoch: int | None = Field(None, ge=0, description="epoch after which observers freeze; "
                                              "empty: half of the epochs + 1")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (numpy and scikit-learn take 32 bits)")


class ExportParams(Section):
    """ONNX export (TorchScript exporter, static shape)."""

    opset: int = Field(17, ge=13, le=19, description="13-19: per-channel Q/DQ needs 13, ORT-TIDL reads up to 19")


class VerifyParams(Section):
    """The quality gate on the exported QDQ model in onnxruntime."""

    max_accuracy_drop: float = Field(1.0, ge=0, description="points of accuracy the int8 model may lose")
    min_float_accuracy: float | None = Field(None, ge=0, le=100, description="stop before quantizing when the "
                                             "float model's val accuracy (%) is below this; empty: chance level "
                                             "(the most frequent class's share) + 10 % of the way to 100; 0: off")
    min_sqnr_db: float = Field(20.0, description="minimum SQNR of int8 logits against float logits, in dB")
    max_tidl_rejects: int | None = Field(0, ge=0, description="fail the gate when the TIDL lint finds more "
                                         "findings that make TIDL reject the model (0: none allowed; empty: no limit)")
    baseline: Literal["ort", "none"] = Field("ort", description="ort: also quantize the float ONNX model with "
                                            "onnxruntime's quantize_static and report it beside ours")


class SensitivityParams(Section):
    """Per-layer sensitivity: which quantized layers cost the most, offered to TIDL in 16 bits."""

    enabled: bool = True
    top_k: int = Field(3, ge=0, description="how many of the worst layers to name")
    images: int = Field(200, ge=1, description="val images used (the stage runs the model once per layer)")
    min_gain_db: float = Field(1.0, ge=0, description="a layer is offered for 16 bits only when leaving it in float "
                               "gains at least this much logit SQNR (on a healthy model the ranking is noise)")


class TidlParams(Section):
    """TIDL compile options for the target device."""

    target_device: Literal["am62a", "am67a", "am68a", "am69a", "tda4vm", "am68pa"] = "am68a"
    calibration_frames: int = Field(4, ge=1, le=1000)
    calibration_iterations: int = Field(1, ge=-1)


class TrackingParams(Section):
    """MLflow: the tracking URI comes from MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), never from here."""

    experiment: str = Field("tidlq", min_length=1)
    required: bool = Field(True, description="false: run and warn when the tracking server cannot be reached")
    register_model: bool = Field(True, description="register the QDQ model as '<model name>-qdq' (a new version "
                                 "only when its SHA-256 is new for that name)")
    keep_versions: int = Field(20, ge=1, description="registered versions kept per model name: older ones are "
                               "deleted, except those an alias (champion, candidate) points at")


class StorageParams(Section):
    """S3 publishing: off unless a bucket is given here or in TIDLQ_S3_BUCKET. Credentials: the AWS chain only."""

    bucket: str | None = Field(None, description="empty: TIDLQ_S3_BUCKET, and no upload when that is unset too")
    prefix: str = Field("tidlq", description="objects go to s3://<bucket>/<prefix>/<model>/<run id>/")
    endpoint_url: str | None = Field(None, description="empty: AWS_ENDPOINT_URL, or AWS's own endpoint")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str | None) -> str | None:
        if v is not None and not BUCKET_NAME.fullmatch(v):
            raise ValueError("must be an S3 bucket name: lowercase letters, digits, '.' and '-' (no '/')")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_stays_inside(cls, v: str) -> str:
        # Keys are <prefix>/<model>/<run id>/...: a '..' or empty segment could land them outside the prefix.
        if not all(_SAFE_SEGMENT.fullmatch(part) for part in v.strip("/").split("/")):
            raise ValueError("must be '/'-separated names of letters, digits, '.', '_' or '-', each starting with a "
                             "letter or digit (no '..' and no empty parts)")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v is not None and "@" in v.partition("://")[2].split("/", 1)[0]:
            raise ValueError("must not hold credentials (user:password@); they come from the AWS chain only")
        return v


class NightlyParams(Section):
    """Many models every night: one quantize deployment run per entry, compared with each model's champion."""

    models: list[dict[str, Any]] = Field(default_factory=list, description="one entry per model: dotted params "
                                         "overrides on top of this file, e.g. {model.source: resnet_tiny}")
    models_file: str | None = Field(None, description="a YAML file with more entries (a list of such mappings)")
    max_parallel: int = Field(2, ge=1, description="deployment runs in flight at once")
    deployment: str = Field("quantize/adhoc", description="the deployment each entry runs")
    timeout_minutes: float = Field(60, gt=0, description="a model run not finished by then counts as failed")
    accuracy_tolerance: float = Field(0.5, ge=0, description="points of int8 accuracy below the champion that "
                                      "count as a regression")
    sqnr_tolerance_db: float = Field(1.0, ge=0, description="dB of logit SQNR below the champion that count as a "
                                     "regression")
    history: int = Field(14, ge=1, description="nights shown in the nightly report's plot")
    experiment: str = Field("tidlq-nightly", min_length=1)


class Params(Section):
    """Everything in params.yaml."""

    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    float_train: FloatTrainParams = Field(default_factory=FloatTrainParams)
    quant: QuantParams = Field(default_factory=QuantParams)
    autopilot: AutopilotParams = Field(default_factory=AutopilotParams)
    qat: QatParams = Field(default_factory=QatParams)
    export: ExportParams = Field(default_factory=ExportParams)
    verify: VerifyParams = Field(default_factory=VerifyParams)
    sensitivity: SensitivityParams = Field(default_factory=SensitivityParams)
    tidl: TidlParams = Field(default_factory=TidlParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    storage: StorageParams = Field(default_factory=StorageParams)
    nightly: NightlyParams = Field(default_factory=NightlyParams)
    output_dir: Path = Path("outputs")

    @property
    def model_dir(self) -> Path:
        """Where this model's published outputs go: `<output_dir>/<model name>`."""
        return self.output_dir / self.model.display_name

    @property
    def stage_root(self) -> Path:
        """Where the content-addressed stage folders live."""
        return self.output_dir / ".stages"


def load_params(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml (or start from defaults when `path` is None), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        raw = _read_yaml(Path(path))
    for dotted, value in (overrides or {}).items():
        _check_tree(value, f"--set {dotted}")
        _set_dotted(raw, dotted, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_explain(exc, where, overrides or {})) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["quant.mode=qat", "qat.epochs=2"] into {"quant.mode": "qat", "qat.epochs": 2} (values read as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. --set quant.mode=qat")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except Exception:  # noqa: BLE001 - not YAML (PyYAML also raises ValueError, e.g. on 2024-13-01): a string
            out[key.strip()] = value
    return out


def flatten(params: Params) -> dict[str, Any]:
    """`{"quant.mode": "ptq", ...}`: every leaf of the params as a dotted key (for logs and tracking)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = obj

    walk("", params.model_dump(mode="json"))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"params file {str(path)!r} not found. Pass an existing file with -p, e.g. -p params.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}). Pass a YAML params "
                        "file with -p.") from None
    try:
        raw = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - YAMLError, and ValueError etc. from typed values such as 2024-13-01
        raise UserError(f"{path}: not valid YAML ({type(exc).__name__}: {exc}). Fix the file's syntax.") from None
    _check_tree(raw, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data, model, quant, ...), got {type(raw).__name__}.")
    return raw


def _check_tree(raw: Any, where: str) -> None:
    """Params are a tree: a YAML anchor that contains its own alias (`&a {x: *a}`) would make every later dump loop."""
    try:
        json.dumps(raw, default=str, skipkeys=True)
    except (ValueError, RecursionError):
        raise UserError(f"{where}: a YAML alias refers to the anchor that contains it (e.g. `&a {{x: *a}}`), which "
                        "makes a recursive structure. Write the values out instead.") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, f"{dotted}."))
    return keys


def _explain(exc: ValidationError, where: str, overrides: dict[str, Any]) -> str:
    known = _known_keys(Params)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "(top level)"
        matches = [k for k in overrides if k == loc or k.startswith(f"{loc}.")]
        origin = f"--set {', '.join(matches)}" if matches else where
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc, known, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else "; remove it."
            lines.append(f"{origin}: unknown key {loc!r}{did_you_mean}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = "" if loc in UNECHOED_FIELDS else f" (got {err.get('input')!r})"
            lines.append(f"{origin}: {loc}: {msg}{got}.")
    return "invalid params:\n  " + "\n  ".join(lines)
