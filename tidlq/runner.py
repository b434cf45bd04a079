"""Running the stage graph (`tidlq.graph`) three ways, with the same keys and the same files:

- `StageRunner`: the flow's. Each stage runs as a Prefect task made from the graph (`stage_task`), whose cache key is
  the stage key and whose cached result is the stage's manifest; outputs go to content-addressed folders
  `<root>/<stage>/<key[:16]>/`. Several params variants (the autopilot's recipes) run stage by stage side by side,
  each distinct key once.
- `build_all`: the same folders without Prefect (tests, benchmarks).
- `Probe`: the flow's keys and folders, read only: the manifests a run would start from when every stage folder is
  already intact, else `Stale` (no Prefect, no torch: `tidlq run`'s up-to-date check, `tidlq.results.uptodate`).
- `build_in_pipeline`: one stage into the fixed folder `pipeline/<name>/` that `dvc repro` tracks, after checking
  that its input folders are intact and were built from the current params (`tidlq stage <name>`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidlq import graph
from tidlq.core import cache
from tidlq.core.errors import UserError
from tidlq.core.params import Params

if TYPE_CHECKING:
    from prefect import Task

Manifests = dict[str, cache.Manifest]
Calls = list[tuple[str, Params, list[cache.Manifest], str]]  # (key, params, upstream manifests, timing label)


@dataclass(frozen=True)
class Outcome:
    """What a flow run built: the manifests of the stages that ran (the autopilot's winner's), each stage's timing,
    and the autopilot's choice."""

    manifests: Manifests
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    choice: dict[str, Any] | None = None


@functools.cache
def stage_task(name: str) -> Task:
    """The Prefect task of stage `name`: builds it into its content-addressed folder; Prefect caches the manifest
    under the stage key (the `key` argument, from `graph.key`)."""
    from prefect import task

    stage = graph.BY_NAME[name]

    def build_stage(root: Path, key: str, params: Params, upstream: list[cache.Manifest]) -> cache.Manifest:
        try:
            return graph.build(stage, params, upstream, cache.stage_dir(root, name, key))
        finally:
            release_memory()

    build_stage.__doc__ = f"Stage {name}: `{stage.module}.run` through the stage cache."
    return task(name=name, cache_key_fn=lambda _context, parameters: parameters["key"],
                persist_result=True)(build_stage)


def release_memory() -> None:
    """Give the memory a finished stage freed back to the system: collect its reference cycles (torch.fx graphs
    have many), then glibc's malloc_trim. Prefect runs tasks on a pool of threads, each with its own malloc arena,
    and without the trim every arena keeps the peak of the stages that ran on it (the autopilot's recipes)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only
        trim(0)


class StageRunner:
    """The flow's runner: stages through their Prefect tasks; remembers every manifest built and each timing."""

    def __init__(self, root: Path, max_parallel: int | None = None) -> None:
        self.root = Path(root)
        self.max_parallel = max_parallel
        self.built: dict[str, cache.Manifest] = {}  # by key: what this run built or found so far
        self.timings: dict[str, dict[str, Any]] = {}

    def outcome(self, params: Params, choice: dict[str, Any] | None = None) -> Outcome:
        """Build every stage for `params`; the outcome (timings of everything this runner ran so far)."""
        return Outcome(self.run([params])[0], dict(self.timings), choice)

    def run(self, variants: list[Params], until: str | None = None,
            labels: list[str] | None = None) -> list[Manifests]:
        """Build the graph, up to stage `until`, for each params variant; each variant's manifests of the stages it
        switches on. Stage by stage, the distinct keys of all variants run at once (at most `max_parallel`); a key
        built earlier in this run is reused. With `labels` (one per variant), a stage is timed as `<stage>:<label>`
        unless all of several variants share its key."""
        every: list[Manifests] = [{} for _ in variants]
        for stage in graph.stages_until(until):
            calls: dict[str, tuple[Params, list[cache.Manifest], int]] = {}
            keys = []
            for i, p in enumerate(variants):
                upstream = [every[i][n] for n in graph.input_names(stage, p)]
                keys.append(key := graph.key(stage, p, upstream))
                if key in self.built:
                    continue
                if graph.off_because(stage, p) is not None:  # a constant folder: no task, no timing
                    self.built[key] = self._constant(stage, p, upstream, key)
                else:
                    calls.setdefault(key, (p, upstream, i))
            shared = labels is None or (len(variants) > 1 and len(set(keys)) == 1)
            self._run_calls(stage.name, [(key, p, up, stage.name if shared else f"{stage.name}:{labels[i]}")
                                         for key, (p, up, i) in calls.items()])
            for i, key in enumerate(keys):
                every[i][stage.name] = self.built[key]
        return [active(manifests) for manifests in every]

    def _constant(self, stage: graph.Stage, params: Params, upstream: list[cache.Manifest], key: str) -> cache.Manifest:
        return graph.build(stage, params, upstream, cache.stage_dir(self.root, stage.name, key))

    def _run_calls(self, name: str, calls: Calls) -> None:
        step = self.max_parallel or len(calls) or 1
        for start in range(0, len(calls), step):
            self._submit(name, calls[start:start + step])

    def _submit(self, name: str, calls: Calls) -> None:
        """Submit calls of one stage at once (Prefect's thread pool; their torch work takes turns on
        `tidlq.quant.fx.quantized_engine`'s lock), wait for all, keep their manifests and the group's wall time.

        When a stage's folder is gone or damaged, its task runs with `refresh_cache=True`, which replaces Prefect's
        stale record; the manifest kept is always the one on disk."""
        build = stage_task(name)
        started = time.perf_counter()
        folders = [cache.stage_dir(self.root, name, key) for key, *_ in calls]
        futures = [build.with_options(refresh_cache=cache.load_intact(folder) is None).submit(self.root, key, p, up)
                   for folder, (key, p, up, _) in zip(folders, calls, strict=True)]
        for future in futures:
            future.wait()
        states = [future.state for future in futures]
        for state in states:
            state.result()  # re-raises the first failure
        seconds = round(time.perf_counter() - started, 3)
        for folder, (key, _, _, label), state in zip(folders, calls, states, strict=True):
            manifest = cache.load_intact(folder)
            if manifest is None:
                raise RuntimeError(f"stage {name} finished, but its folder {folder} is missing or damaged")
            self.built[key] = manifest
            self.timings[label] = {"cached": state.name == "Cached", "seconds": seconds}


class Stale(Exception):
    """A stage folder the run needs is missing or damaged: the run has work to do."""


class Probe(StageRunner):
    """A runner that builds nothing: `outcome` and `run` answer with the manifests of the stage folders already
    there, and raise `Stale` at the first folder that is missing or damaged."""

    def _constant(self, stage: graph.Stage, params: Params, upstream: list[cache.Manifest], key: str) -> cache.Manifest:
        return self._intact(stage.name, key)

    def _run_calls(self, name: str, calls: Calls) -> None:
        for key, *_ in calls:
            self.built[key] = self._intact(name, key)

    def _intact(self, name: str, key: str) -> cache.Manifest:
        folder = cache.stage_dir(self.root, name, key)
        manifest = cache.load_intact(folder)
        if manifest is None or manifest.key != key:
            raise Stale(f"stage {name}: {folder} is missing or damaged")
        return manifest


def build_all(params: Params, root: Path, until: str | None = None) -> Manifests:
    """Build the graph (up to stage `until`) into content-addressed folders under `root`, without Prefect; the
    manifests of the stages these params switch on."""
    manifests: Manifests = {}
    for stage in graph.stages_until(until):
        upstream = [manifests[n] for n in graph.input_names(stage, params)]
        folder = cache.stage_dir(root, stage.name, graph.key(stage, params, upstream))
        manifests[stage.name] = graph.build(stage, params, upstream, folder)
    return active(manifests)


def active(manifests: Manifests) -> Manifests:
    """The manifests of the stages that ran (not switched off)."""
    return {name: m for name, m in manifests.items() if not graph.is_skipped(m)}


def build_in_pipeline(name: str, params: Params, root: Path = Path(graph.DVC_ROOT)) -> cache.Manifest:
    """Build stage `name` (or the final `publish`) into `root/name` from the current params and its (checked) input
    folders: what `tidlq stage <name>` and so `dvc repro` run."""
    if params.quant.mode == "auto":
        raise UserError("quant.mode auto tries several recipes side by side and runs in the flow (tidlq run); dvc "
                        "repro builds one recipe: set quant.mode to ptq or qat for it.")
    if name == graph.PUBLISH:
        from tidlq.results import pipeline_report

        manifests = active({s.name: current(s.name, params, root, needed_by=name) for s in graph.STAGES})
        return pipeline_report.build(params, manifests, root / name)
    stage = graph.stage(name)
    upstream = [current(n, params, root, needed_by=name) for n in graph.input_names(stage, params)]
    return graph.build(stage, params, upstream, root / name)


def current(name: str, params: Params, root: Path, needed_by: str) -> cache.Manifest:
    """The manifest of stage folder `root/name`, if it is intact and was built from the current params and
    inputs."""
    folder = root / name
    manifest = cache.load_intact(folder)
    if manifest is None:
        raise UserError(f"stage {needed_by} needs {folder}/, made by stage {name}, and it is missing or damaged. "
                        f"Run `dvc repro {needed_by}` (or `tidlq stage {name}` first).")
    stage = graph.BY_NAME[name]
    upstream = [] if graph.off_because(stage, params) else [cache.load_intact(root / n)
                                                            for n in graph.input_names(stage, params)]
    expected = None if None in upstream else graph.key(stage, params, upstream)  # type: ignore[arg-type]
    if manifest.key != expected:
        raise UserError(f"stage {needed_by} needs {folder}/, but it was built from other params or inputs than the "
                        f"current ones (params {', '.join(stage.params) or 'none'}, or an earlier stage changed). "
                        f"Run `dvc repro {needed_by}` to rebuild what is out of date.")
    return manifest
