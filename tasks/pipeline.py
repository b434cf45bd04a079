"""The stages as `dvc repro` runs them: `tidlq stage <name>` builds one stage into a fixed folder `pipeline/<name>/`.

Each stage's `run()` takes its params sections, then its input stage folders, then its output folder; the folder gets
the same manifest and cache key as the Prefect flow's content-addressed folder, so both ways of running build the
same files from the same params. Before a stage runs, every input folder is checked: present, intact (digests), and
built from the current params and inputs (its key recomputed); otherwise the error says which stage to run first.
`dvc_yaml()` derives dvc.yaml from the same table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import cache, files, inputs
from tasks.errors import UserError
from tasks.params import Params

ROOT = Path("pipeline")
PREPARED = "prepared"  # calibrate (ptq) or train_qat (qat), as quant.mode says


@dataclass(frozen=True)
class Stage:
    """A stage: its params sections (or single dotted values) and input stages, in the order its `run()` takes
    them."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    fingerprint: str | None = None  # dotted params field naming a file whose content is part of the key
    switch: str | None = None  # dotted params field that turns the stage on or off (a DVC param, not a run() argument)

    @property
    def module(self) -> str:
        """The module holding the stage's `run()`."""
        return f"tasks.{self.name}"


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare_data", ("data",), (), "data.source"),
    Stage("float_model", ("model", "float_train"), ("prepare_data",), "model.weights"),
    Stage("evaluate_float", ("export",), ("float_model", "prepare_data")),
    Stage("baseline_ort", ("quant",), ("evaluate_float", "prepare_data"), switch="verify.baseline"),
    Stage("calibrate", ("quant", "tidl.target_device"), ("float_model", "prepare_data")),
    Stage("train_qat", ("quant", "qat", "tidl.target_device"), ("float_model", "prepare_data")),
    Stage("convert", (), (PREPARED, "float_model", "prepare_data")),
    Stage("export_qdq", ("export", "tidl.target_device"), ("convert", PREPARED, "float_model")),
    Stage("verify_onnx", ("verify",), ("export_qdq", "evaluate_float", "convert", "prepare_data")),
    Stage("sensitivity", ("sensitivity",), (PREPARED, "float_model", "prepare_data", "export_qdq")),
    Stage("tidl_bundle", ("tidl",), ("export_qdq", "prepare_data", "sensitivity")),
)}
PUBLISH = "publish"


def run(name: str, params: Params, root: Path = ROOT) -> cache.Manifest:
    """Build stage `name` into `root/name` from the current params and its (checked) input folders."""
    if params.quant.mode == "auto":
        raise UserError("quant.mode auto tries several recipes side by side and runs in the flow (tidlq run); dvc "
                        "repro builds one recipe: set quant.mode to ptq or qat for it.")
    if name == PUBLISH:
        return _publish(params, root)
    stage = _stage(name)
    if _inactive(stage, params):
        return _skip(stage, params, root)
    upstream = [current(_resolve(i, params), params, root, needed_by=name) for i in stage.inputs]
    key = cache.stage_key(name, stage.module, key_args(stage, params, upstream))
    sections = [_value(params, s) for s in stage.sections]
    module = importlib.import_module(stage.module)
    return cache.write_stage(root / name, name, key, lambda out: module.run(*sections, *[m.dir for m in upstream], out))


def key_args(stage: Stage, params: Params, upstream: list[cache.Manifest]) -> list[Any]:
    """The arguments of the stage's cache key, in the order its Prefect task takes them."""
    args: list[Any] = [_value(params, s) for s in stage.sections]
    if stage.fingerprint:
        args.append(inputs.fingerprint(_value(params, stage.fingerprint), stage.fingerprint))
    return [*args, *upstream]


def current(name: str, params: Params, root: Path, needed_by: str) -> cache.Manifest:
    """The manifest of input stage `name`, if its folder is intact and was built from the current params."""
    folder = root / name
    manifest = cache.load_intact(folder)
    if manifest is None:
        raise UserError(f"stage {needed_by} needs {folder}/, made by stage {name}, and it is missing or damaged. "
                        f"Run `dvc repro {needed_by}` (or `tidlq stage {name}` first).")
    stage = STAGES[name]
    if _inactive(stage, params):
        expected = _skip_key(stage, params)
    else:
        upstream = [cache.load_intact(root / _resolve(i, params)) for i in stage.inputs]
        expected = None if any(m is None for m in upstream) else cache.stage_key(
            name, stage.module, key_args(stage, params, upstream))  # type: ignore[arg-type]
    if manifest.key != expected:
        raise UserError(f"stage {needed_by} needs {folder}/, but it was built from other params or inputs than the "
                        f"current ones (params.yaml sections {', '.join(stage.sections) or 'none'}, or an earlier "
                        f"stage changed). Run `dvc repro {needed_by}` to rebuild what is out of date.")
    return manifest


def dvc_yaml(params: Params) -> dict[str, Any]:
    """dvc.yaml for these params: one stage per pipeline stage, its code and input folders as deps, the params
    sections it reads, its folder as out; the summary as metrics and the plot data as plots."""
    stages: dict[str, Any] = {}
    for stage in STAGES.values():
        deps = sorted(_code_files(stage.module)) + [f"{ROOT}/{i}" for s in stage.inputs for i in _both(s)]
        source = _local_input(stage, params)
        stages[stage.name] = {"cmd": f"tidlq stage {stage.name}", "deps": deps + ([source] if source else []),
                              "params": _dvc_params(stage), "outs": [f"{ROOT}/{stage.name}"]}
    publish = f"{ROOT}/{PUBLISH}"
    stages[PUBLISH] = {
        "cmd": f"tidlq stage {PUBLISH}",
        "deps": sorted(_code_files("tasks.publish")) + [f"{ROOT}/{s}" for s in STAGES],
        "params": list(Params.model_fields),  # summary.json carries the digest of all params
        "outs": [f"{publish}/report", {f"{publish}/accuracy.json": {"cache": False}},
                 {f"{publish}/training.json": {"cache": False}}],
        "metrics": [{f"{publish}/metrics.json": {"cache": False}}],
    }
    plots = [{f"{publish}/accuracy.json": {"x": "model", "y": "accuracy", "template": "bar_horizontal",
                                           "title": "float vs int8 accuracy (%)"}},
             {f"{publish}/training.json": {"x": "epoch", "y": ["loss", "accuracy"],
                                           "title": "training per epoch (QAT in qat mode, else float)"}}]
    return {"stages": stages, "plots": plots}


def _dvc_params(stage: Stage) -> list[str]:
    """The params.yaml keys a stage reads: its sections, its switch, and quant.mode when it picks calibrate or
    train_qat."""
    keys = list(stage.sections) + ([stage.switch] if stage.switch else [])
    if PREPARED in stage.inputs and "quant" not in keys:
        keys.append("quant.mode")
    return keys


def _publish(params: Params, root: Path) -> cache.Manifest:
    from tasks import publish

    names = [s for s in STAGES if not _inactive(STAGES[s], params)]
    manifests = {n: current(n, params, root, needed_by=PUBLISH) for n in names}
    key = cache.stage_key(PUBLISH, "tasks.publish", [params, *manifests.values()])
    return cache.write_stage(root / PUBLISH, PUBLISH, key,
                             lambda out: publish.run_in_pipeline(params, manifests, out))


def _value(params: Params, dotted: str) -> Any:
    """A params section ("quant") or one value ("tidl.target_device")."""
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _stage(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; the stages are: {', '.join([*STAGES, PUBLISH])}.")
    return STAGES[name]


def _resolve(name: str, params: Params) -> str:
    if name == PREPARED:
        return "train_qat" if params.quant.mode == "qat" else "calibrate"
    return name


def _both(name: str) -> tuple[str, ...]:
    return ("calibrate", "train_qat") if name == PREPARED else (name,)


def _inactive(stage: Stage, params: Params) -> str | None:
    """Why a stage does nothing with these params (None: it runs)."""
    if stage.name in ("calibrate", "train_qat") and _resolve(PREPARED, params) != stage.name:
        return f"quant.mode is {params.quant.mode}"
    if stage.name == "baseline_ort" and params.verify.baseline != "ort":
        return f"verify.baseline is {params.verify.baseline}"
    if stage.name == "sensitivity" and not params.sensitivity.enabled:
        return "sensitivity.enabled is false"
    return None


def _skip(stage: Stage, params: Params, root: Path) -> cache.Manifest:
    """A stage these params do not use: a constant folder, so that DVC sees no change downstream."""
    reason = {"skipped": True, "reason": _inactive(stage, params)}
    return cache.write_stage(root / stage.name, stage.name, _skip_key(stage, params),
                             lambda out: files.write_json(out / "skipped.json", reason) or reason)


def _skip_key(stage: Stage, params: Params) -> str:
    return files.sha256_json({"skipped": stage.name, "why": _inactive(stage, params)})


def _code_files(module: str) -> set[str]:
    project = Path(__file__).resolve().parents[1]
    return {cache._source_path(m).relative_to(project).as_posix() for m in cache._project_closure(module)}


def _local_input(stage: Stage, params: Params) -> str | None:
    """A local file or folder named in params (data.source, model.weights) is a DVC dependency too."""
    if not stage.fingerprint:
        return None
    value = _value(params, stage.fingerprint)
    if value in (None, "digits") or str(value).startswith("s3://"):
        return None
    return str(value)
