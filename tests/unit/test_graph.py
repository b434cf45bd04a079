"""The stage graph: its declaration matches the stage modules, stages stand alone, and every way of running it
computes the same cache keys for every combination of switches."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tests.stub_stages import COMBINATIONS, combination_id, stub_run
from tidlq import graph, runner
from tidlq.core import cache, files
from tidlq.core.params import Params, load_params


@pytest.mark.parametrize("stage", graph.STAGES, ids=lambda s: s.name)
def test_each_stage_module_runs_what_the_graph_declares(stage: graph.Stage) -> None:
    run = graph.stage_run(stage)
    arguments = list(inspect.signature(run).parameters)
    assert len(arguments) == len(stage.params) + len(stage.inputs) + 1, arguments
    assert arguments[-1] == "out"
    assert run.__doc__


@pytest.mark.parametrize("stage", graph.STAGES, ids=lambda s: s.name)
def test_no_stage_imports_another_stage(stage: graph.Stage) -> None:
    stages = {m for m in cache._project_closure(stage.module) if m.startswith("tidlq.stages.")}
    assert stages == {stage.module}


def test_editing_the_image_loader_changes_only_the_keys_of_the_stages_that_run_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = load_params(None)
    upstream = cache.Manifest(stage="up", key="k", dir=tmp_path, files={"a": "0" * 64})
    keys = {s.name: graph.key(s, p, [upstream] * len(s.inputs)) for s in graph.STAGES}
    loader = "tidlq.data.sources"
    edited = tmp_path / "sources.py"
    edited.write_text(cache._source_path(loader).read_text() + "\n# an edit\n")
    real = cache._source_path
    monkeypatch.setattr(cache, "_source_path", lambda m: edited if m == loader else real(m))
    cache.code_digest.cache_clear()
    try:
        after = {s.name: graph.key(s, p, [upstream] * len(s.inputs)) for s in graph.STAGES}
    finally:
        cache.code_digest.cache_clear()
    assert [name for name in keys if keys[name] != after[name]] == ["prepare_data"]


@pytest.fixture
def stub_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "stage_run", stub_run)


def dvc_keys(p: Params, root: Path) -> dict[str, str]:
    """Every stage built as `dvc repro` builds it, in order, into fixed folders: {stage: key}."""
    return {s.name: runner.build_in_pipeline(s.name, p, root).key for s in graph.STAGES}


@pytest.mark.parametrize("switches", COMBINATIONS, ids=combination_id)
def test_content_addressed_and_dvc_runs_compute_the_same_keys(stub_stages: None, tmp_path: Path,
                                                              switches: dict) -> None:
    p = load_params(None, {**switches, "output_dir": str(tmp_path / "out")})
    built = runner.build_all(p, tmp_path / "stages")
    dvc = dvc_keys(p, tmp_path / "pipeline")
    assert {name: m.key for name, m in built.items()} == {name: dvc[name] for name in built}
    off = {s.name for s in graph.STAGES if graph.off_because(s, p)}
    assert set(built) == set(dvc) - off
    assert ("train_qat" in off) == (switches["quant.mode"] == "ptq")
    bundle = files.read_json(built["tidl_bundle"].path("out.json"))
    assert (bundle["inputs"][2] is None) == (not switches["sensitivity.enabled"])  # a switched-off input: None


def test_dvc_yaml_lists_what_each_stage_reads() -> None:
    stages = graph.dvc_yaml(load_params(None))["stages"]
    assert list(stages) == [*graph.BY_NAME, graph.PUBLISH]
    assert stages["baseline_ort"]["params"] == ["quant.batch_size", "quant.calibration_batches", "verify.baseline"]
    assert stages["convert"]["params"] == ["quant.mode"]
    assert "pipeline/calibrate" in stages["convert"]["deps"] and "pipeline/train_qat" in stages["convert"]["deps"]
    assert "tidlq/data/sources.py" in stages["prepare_data"]["deps"]
    assert not any("tidlq/data/sources.py" in s["deps"] for name, s in stages.items() if name != "prepare_data")
