"""Content-addressed stage folders, and the Prefect cache key that names them.

A stage's key is the SHA-256 of its name, the digest of the project code it runs (its module and every `tasks.*`
module it imports, transitively), the versions of the libraries that shape its output, its params sections
(canonical JSON) and the content digests of its input files. Its outputs live in `<root>/<stage>/<key[:16]>/`,
written to a temporary folder and renamed into place, with a `manifest.json` that lists every file's SHA-256; runs
that build the same folder at the same time take turns on a lock file beside it, and the later one reuses it.

Prefect caches the stage's `Manifest` under the same key (`tidlq.runner`). Imports inside `if TYPE_CHECKING:` are
for type checkers only and are not part of a stage's code: a stage's key covers the code it really runs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tidlq.core import files

MANIFEST = "manifest.json"
_PROJECT = Path(__file__).resolve().parents[2]  # holds the `tidlq` package
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


@functools.cache
def code_digest(module: str) -> str:
    """SHA-256 over the source of `module` and every project module it imports, transitively."""
    h = hashlib.sha256()
    for name in sorted(_project_closure(module)):
        h.update(name.encode() + b"\0" + _path(name).read_bytes() + b"\0")
    return h.hexdigest()


def code_files(module: str) -> set[str]:
    """The project source files of `module`'s code digest, relative to the project root (DVC deps)."""
    return {_path(m).relative_to(_PROJECT).as_posix() for m in _project_closure(module)}


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
    """The `tidlq.*` modules that `module` imports (absolute or relative), except under `if TYPE_CHECKING:`."""
    package = module.split(".")[0]
    tree = ast.parse(_path(module).read_text())
    found = []
    for node in _runtime_nodes(tree):
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


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those inside `if TYPE_CHECKING:` blocks."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module(name: str) -> bool:
    return _source_path(name) is not None


def _path(module: str) -> Path:
    path = _source_path(module)
    assert path is not None, module
    return path


def _source_path(module: str) -> Path | None:
    """The source file of project module `module` (`a/b.py` or `a/b/__init__.py` under the project root), found on
    disk: importing a package to ask would import what its `__init__` imports (torch), and keys must stay cheap."""
    base = _PROJECT.joinpath(*module.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


@functools.lru_cache(maxsize=1)
def _library_versions() -> str:
    return ",".join(f"{lib}={importlib.metadata.version(lib)}" for lib in _KEYED_LIBRARIES)


def _canonical_arg(arg: Any) -> str:
    if isinstance(arg, Manifest):
        return files.canonical_json({"stage": arg.stage, "files": arg.files})
    if isinstance(arg, BaseModel):
        return files.canonical_json(arg.model_dump(mode="json"))
    return files.canonical_json(arg)
