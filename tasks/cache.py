"""Content-addressed stage folders, and the Prefect cache key that names them.

A stage's key is the SHA-256 of its name, the digest of the project code it runs (its module and every `tasks.*`
module it imports, transitively), the versions of the libraries that shape its output, its params sections
(canonical JSON) and the content digests of its input files. Its outputs live in `<root>/<stage>/<key[:16]>/`,
written to a temporary folder and renamed into place, with a `manifest.json` that lists every file's SHA-256; runs
that build the same folder at the same time take turns on a lock file beside it, and the later one reuses it.

Prefect caches the stage's `Manifest` under the same key. `StageRunner.run` checks the folder before calling the task:
when it is gone or damaged, the task runs again with `refresh_cache=True`, which overwrites the stale record.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import files

MANIFEST = "manifest.json"
# Libraries whose version changes what a stage writes; part of every key.
_KEYED_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxslim", "numpy", "scikit-learn")


class Manifest(BaseModel):
    """What a stage produced: its folder, each file's SHA-256, and small JSON facts for later stages."""

    stage: str
    key: str
    dir: Path
    files: dict[str, str]
    info: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        """Absolute path of one of the stage's files."""
        return self.dir / name


def stage_dir(root: Path, stage: str, key: str) -> Path:
    """The folder that holds the outputs of `stage` for `key`."""
    return Path(root).resolve() / stage / key[:16]


def stage_key(stage: str, module: str, args: Sequence[Any]) -> str:
    """The cache key of `stage` run by `module` on `args` (params sections and upstream manifests)."""
    h = hashlib.sha256()
    for part in (stage, code_digest(module), _library_versions(), *map(_canonical_arg, args)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key_fn(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: the stage key from the task's parameters (all but `root`)."""
    task = context.task
    args = [v for k, v in parameters.items() if k != "root"]
    return stage_key(task.name, task.fn.__module__, args)


TASK_OPTIONS: dict[str, Any] = {"cache_key_fn": cache_key_fn, "persist_result": True}


def build(root: Path, stage: str, module: str, args: Sequence[Any], work: Callable[[Path], dict]) -> Manifest:
    """Run `work(folder)` into the stage's content-addressed folder under `root`."""
    key = stage_key(stage, module, args)
    return write_stage(stage_dir(root, stage, key), stage, key, work)


def write_stage(final: Path, stage: str, key: str, work: Callable[[Path], dict]) -> Manifest:
    """Run `work(folder)` in a temporary folder, write its manifest (file digests, the facts `work` returns; nothing
    that varies between identical runs), and rename the folder to `final` in one step.

    Processes building the same `final` take turns on its lock file; one that finds `final` already intact (built by
    the other while it waited) returns that manifest without running `work`. Different keys never wait on each other.
    """
    with files.lock(final):
        built = load_intact(final)
        if built is not None and built.key == key:
            return built
        with files.atomic_dir(final) as tmp:
            info = work(tmp) or {}
            digests = {p.relative_to(tmp).as_posix(): files.sha256_file(p) for p in sorted(tmp.rglob("*"))
                       if p.is_file()}
            files.write_json(tmp / MANIFEST, {"stage": stage, "key": key, "files": digests, "info": info})
    return Manifest(stage=stage, key=key, dir=Path(final), files=digests, info=info)


def load_intact(folder: Path) -> Manifest | None:
    """The manifest of a stage folder if every file it lists is present with the right digest, else None."""
    try:
        raw = files.read_json(folder / MANIFEST)
        if any(files.sha256_file(folder / name) != digest for name, digest in raw["files"].items()):
            return None
        return Manifest(dir=folder, **raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StageRunner:
    """Runs a flow's stages through the cache and remembers each stage's manifest and timing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifests: dict[str, Manifest] = {}
        self.timings: dict[str, dict[str, Any]] = {}

    def run(self, stage_task: Any, *args: Any, label: str | None = None) -> Manifest:
        """Call a stage's Prefect task through the cache and return its manifest; re-raise its exception.

        When the stage's folder is gone or damaged, the task runs with `refresh_cache=True`, which replaces the
        stale Prefect record; the manifest returned is always the one on disk. `label` names it in the timings.
        """
        return self.run_many(stage_task, [args], [label or stage_task.name])[0]

    def run_many(self, stage_task: Any, calls: list[tuple], labels: list[str]) -> list[Manifest]:
        """Submit several calls of one stage at once (Prefect's thread pool runs them side by side; their torch work
        takes turns on `qconfig.quantized_engine`'s lock, since torch.fx tracing and the quantized engine are
        process-wide), wait for all; return their manifests in order. Each label's time is the group's wall time."""
        name, module = stage_task.name, stage_task.fn.__module__
        folders = [stage_dir(self.root, name, stage_key(name, module, args)) for args in calls]
        started = time.perf_counter()
        futures = [stage_task.with_options(refresh_cache=load_intact(folder) is None).submit(self.root, *args)
                   for folder, args in zip(folders, calls, strict=True)]
        for future in futures:
            future.wait()
        states = [future.state for future in futures]
        for state in states:
            state.result()  # re-raises the first failure
        seconds = round(time.perf_counter() - started, 3)
        manifests = []
        for label, folder, state in zip(labels, folders, states, strict=True):
            manifest = load_intact(folder)
            if manifest is None:
                raise RuntimeError(f"stage {name} finished, but its folder {folder} is missing or damaged")
            self.manifests[label] = manifest
            self.timings[label] = {"cached": state.name == "Cached", "seconds": seconds}
            manifests.append(manifest)
        return manifests


@functools.cache
def code_digest(module: str) -> str:
    """SHA-256 over the source of `module` and every project module it imports, transitively."""
    h = hashlib.sha256()
    for name in sorted(_project_closure(module)):
        h.update(name.encode() + b"\0" + _source_path(name).read_bytes() + b"\0")
    return h.hexdigest()


def _project_closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_project_imports(name))
    return seen


def _project_imports(module: str) -> list[str]:
    """The `tasks.*` modules that `module` imports (absolute or relative)."""
    package = module.split(".")[0]
    tree = ast.parse(_source_path(module).read_text())
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found.extend(n for n in names if n.split(".")[0] == package and _is_module(n))
    return found


def _is_module(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and spec.origin.endswith(".py")


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return Path(spec.origin)


@functools.lru_cache(maxsize=1)
def _library_versions() -> str:
    return ",".join(f"{lib}={importlib.metadata.version(lib)}" for lib in _KEYED_LIBRARIES)


def _canonical_arg(arg: Any) -> str:
    if isinstance(arg, Manifest):
        return files.canonical_json({"stage": arg.stage, "files": arg.files})
    if isinstance(arg, BaseModel):
        return files.canonical_json(arg.model_dump(mode="json"))
    return files.canonical_json(arg)
