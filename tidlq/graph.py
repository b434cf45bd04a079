"""The stage graph, declared once: every stage's name, the params it reads, its input stages and its switch.

Everything else is derived from this table: the Prefect tasks (`tidlq.runner.stage_task`), the order and arguments
of the flow's calls (`tidlq.runner`), `dvc.yaml` (`dvc_yaml`), and each stage's cache key (`key`). A stage is a
module `tidlq.stages.<name>` with a pure `run(*params, *input_folders, out) -> dict`: its params values in the order
of `params`, then the folders of its `inputs` in that order (None for an input whose stage is switched off), then
the folder to write into.

    params.yaml ─► prepare_data ─► float_model ─► evaluate_float ─► baseline_ort (verify.baseline: ort)
                                      │
                        ┌─────────────┴─────────────┐
                  calibrate (ptq)              train_qat (qat)
                        └─────────────┬─────────────┘
                                   convert ─► export_qdq ─► verify_onnx ─► sensitivity ─► tidl_bundle ─► publish

A switched-off stage (for example sensitivity with `sensitivity.enabled: false`) still has a manifest: a constant
folder holding `skipped.json`, whose key depends only on why it is off. The flow and `dvc repro` both build it, so
the stages after it get the same cache key whichever way the pipeline runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidlq.core import cache, files, inputs
from tidlq.core.errors import UserError
from tidlq.core.params import Params

PREPARED = ("calibrate", "train_qat")  # an input that is whichever of the two quant.mode switches on
PUBLISH, PUBLISH_MODULE = "publish", "tidlq.results.pipeline_report"  # dvc repro's last stage (tidlq.runner)
DVC_ROOT = "pipeline"  # where `dvc repro` builds each stage: pipeline/<name>/


@dataclass(frozen=True)
class Switch:
    """A params field that turns a stage on: the stage runs when the field's value is `on`."""

    field: str
    on: Any

    def off_because(self, params: Params) -> str | None:
        """Why the stage is off with these params (None: it runs)."""
        value = value_of(params, self.field)
        return None if value == self.on else f"{self.field} is {value}"


@dataclass(frozen=True)
class Stage:
    """One stage: the params it reads (sections or dotted values), its input stages, in the order its `run()` takes
    them; a params field naming a file whose content is part of its key; its switch."""

    name: str
    params: tuple[str, ...]
    inputs: tuple[str | tuple[str, ...], ...] = ()
    fingerprint: str | None = None
    switch: Switch | None = None

    @property
    def module(self) -> str:
        """The module that holds the stage's `run()`."""
        return f"tidlq.stages.{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("prepare_data", ("data",), fingerprint="data.source"),
    Stage("float_model", ("model", "float_train"), ("prepare_data",), fingerprint="model.weights"),
    Stage("evaluate_float", ("export", "verify.min_float_accuracy"), ("float_model", "prepare_data")),
    Stage("baseline_ort", ("quant.batch_size", "quant.calibration_batches"), ("evaluate_float", "prepare_data"),
          switch=Switch("verify.baseline", "ort")),
    Stage("calibrate", ("quant", "tidl.target_device"), ("float_model", "prepare_data"),
          switch=Switch("quant.mode", "ptq")),
    Stage("train_qat", ("quant", "qat", "tidl.target_device"), ("float_model", "prepare_data"),
          switch=Switch("quant.mode", "qat")),
    Stage("convert", (), (PREPARED, "float_model", "prepare_data")),
    Stage("export_qdq", ("export", "tidl.target_device"), ("convert", PREPARED, "float_model")),
    Stage("verify_onnx", ("verify",), ("export_qdq", "evaluate_float", "convert", "prepare_data")),
    Stage("sensitivity", ("sensitivity",), (PREPARED, "float_model", "prepare_data", "export_qdq"),
          switch=Switch("sensitivity.enabled", True)),
    Stage("tidl_bundle", ("tidl",), ("export_qdq", "prepare_data", "sensitivity")),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
SKIPPED = "skipped.json"


def stages_until(last: str | None = None) -> Iterator[Stage]:
    """The stages in order, up to and including `last` (all of them when None)."""
    for stage in STAGES:
        yield stage
        if stage.name == last:
            return


def value_of(params: Params, dotted: str) -> Any:
    """A params section ("quant") or one value ("tidl.target_device")."""
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def off_because(stage: Stage, params: Params) -> str | None:
    """Why `stage` does nothing with these params (None: it runs)."""
    return stage.switch.off_because(params) if stage.switch else None


def input_names(stage: Stage, params: Params) -> list[str]:
    """The stages `stage` reads, alternatives resolved to the one these params switch on."""
    return [name if isinstance(name, str) else next(n for n in name if off_because(BY_NAME[n], params) is None)
            for name in stage.inputs]


def key(stage: Stage, params: Params, upstream: list[cache.Manifest]) -> str:
    """The cache key of `stage` with these params and input manifests (a switched-off stage: its reason only)."""
    reason = off_because(stage, params)
    if reason is not None:
        return files.sha256_json({"skipped": stage.name, "why": reason})
    args: list[Any] = [value_of(params, p) for p in stage.params]
    if stage.fingerprint:
        args.append(inputs.fingerprint(value_of(params, stage.fingerprint), stage.fingerprint))
    return cache.stage_key(stage.name, stage.module, [*args, *upstream])


def build(stage: Stage, params: Params, upstream: list[cache.Manifest], folder: Path) -> cache.Manifest:
    """Build `stage` into `folder` (atomically; reused when intact and of the same key): its `run()`, or the
    `skipped.json` of a switched-off stage."""
    reason = off_because(stage, params)
    stage_key = key(stage, params, upstream)
    if reason is not None:
        note = {"skipped": True, "reason": reason}
        return cache.write_stage(folder, stage.name, stage_key,
                                 lambda out: files.write_json(out / SKIPPED, note) or note)
    run = stage_run(stage)
    values = [value_of(params, p) for p in stage.params]
    dirs = [None if is_skipped(m) else m.dir for m in upstream]
    return cache.write_stage(folder, stage.name, stage_key, lambda out: run(*values, *dirs, out))


def stage_run(stage: Stage) -> Callable[..., dict]:
    """The stage's `run(*params, *input_folders, out) -> dict` (imported when first needed: stages import torch)."""
    return importlib.import_module(stage.module).run


def is_skipped(manifest: cache.Manifest) -> bool:
    """Whether a manifest is a switched-off stage's constant folder."""
    return manifest.info.get("skipped") is True


def stage(name: str) -> Stage:
    """The stage called `name`; a UserError listing the stages for any other name."""
    if name not in BY_NAME:
        raise UserError(f"unknown stage {name!r}; the stages are: {', '.join([*BY_NAME, PUBLISH])}.")
    return BY_NAME[name]


def dvc_yaml(params: Params) -> dict[str, Any]:
    """dvc.yaml for these params: one stage per pipeline stage (`tidlq stage <name>` into `pipeline/<name>/`), its
    code and input folders as deps, the params it reads, its folder as out; the publish stage's summary as metrics
    and its plot data as plots."""
    stages: dict[str, Any] = {}
    for s in STAGES:
        deps = sorted(cache.code_files(s.module)) + [f"{DVC_ROOT}/{n}" for i in s.inputs
                                                      for n in ((i,) if isinstance(i, str) else i)]
        source = _local_input(s, params)
        stages[s.name] = {"cmd": f"tidlq stage {s.name}", "deps": deps + ([source] if source else []),
                          "params": _dvc_params(s), "outs": [f"{DVC_ROOT}/{s.name}"]}
    publish = f"{DVC_ROOT}/{PUBLISH}"
    stages[PUBLISH] = {
        "cmd": f"tidlq stage {PUBLISH}",
        "deps": sorted(cache.code_files(PUBLISH_MODULE)) + [f"{DVC_ROOT}/{s.name}" for s in STAGES],
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


def _dvc_params(s: Stage) -> list[str]:
    """The params.yaml keys a stage reads: its params, its switch, and quant.mode when it reads calibrate or
    train_qat."""
    keys = list(s.params) + ([s.switch.field] if s.switch and s.switch.field not in s.params else [])
    if PREPARED in s.inputs and "quant" not in keys and "quant.mode" not in keys:
        keys.append("quant.mode")
    return keys


def _local_input(s: Stage, params: Params) -> str | None:
    """A local file or folder named in params (data.source, model.weights) is a DVC dependency too."""
    if not s.fingerprint:
        return None
    value = value_of(params, s.fingerprint)
    if value in (None, "digits") or str(value).startswith("s3://"):
        return None
    return str(value)


def dvc_yaml_text(params: Params) -> str:
    """dvc.yaml as `tidlq dvc-yaml` writes it."""
    import yaml

    return "# Generated by `tidlq dvc-yaml` from tidlq/graph.py; edit that, not this.\n" + yaml.safe_dump(
        dvc_yaml(params), sort_keys=False, width=120)
