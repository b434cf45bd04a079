"""The stage cache: keys that change exactly when code, params, library versions or input contents change; atomic
folders; integrity checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import cache, files
from tasks.params import QatParams, QuantParams


def manifest(tmp_path: Path, content: bytes, name: str = "up") -> cache.Manifest:
    def work(out: Path) -> dict:
        (out / "a.bin").write_bytes(content)
        return {"size": len(content)}

    return cache.build(tmp_path, name, "tasks.calibrate", [], work)


def test_key_depends_on_params_inputs_and_stage(tmp_path: Path) -> None:
    up = manifest(tmp_path, b"one")
    key = cache.stage_key("calibrate", "tasks.calibrate", [QuantParams(), up])
    assert key == cache.stage_key("calibrate", "tasks.calibrate", [QuantParams(), up])
    assert key != cache.stage_key("calibrate", "tasks.calibrate", [QuantParams(calibration_batches=3), up])
    assert key != cache.stage_key("convert", "tasks.calibrate", [QuantParams(), up])
    other = manifest(tmp_path, b"two")
    assert key != cache.stage_key("calibrate", "tasks.calibrate", [QuantParams(), other])


def test_key_ignores_where_an_input_lives(tmp_path: Path) -> None:
    a = manifest(tmp_path / "a", b"same")
    b = manifest(tmp_path / "b", b"same")
    assert a.dir != b.dir
    assert cache.stage_key("convert", "tasks.convert", [a]) == cache.stage_key("convert", "tasks.convert", [b])


def test_code_digest_follows_project_imports() -> None:
    closure = cache._project_closure("tasks.train_qat")
    assert {"tasks.train_qat", "tasks.training", "tasks.qconfig", "tasks.models", "tasks.params",
            "tasks.prepare_data", "tasks.cache", "tasks.files"} <= closure
    assert "tasks.tidl_bundle" not in closure
    assert cache.code_digest("tasks.train_qat") != cache.code_digest("tasks.calibrate")


def test_code_change_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache.stage_key("train_qat", "tasks.train_qat", [QatParams()])
    unrelated = cache.stage_key("tidl_bundle", "tasks.tidl_bundle", [])
    edited = tmp_path / "training.py"
    edited.write_text(cache._source_path("tasks.training").read_text() + "\n# an edit\n")
    real = cache._source_path
    monkeypatch.setattr(cache, "_source_path", lambda m: edited if m == "tasks.training" else real(m))
    cache.code_digest.cache_clear()
    try:
        assert cache.stage_key("train_qat", "tasks.train_qat", [QatParams()]) != before
        assert cache.stage_key("tidl_bundle", "tasks.tidl_bundle", []) == unrelated
    finally:
        cache.code_digest.cache_clear()


def test_build_writes_manifest_and_verifies(tmp_path: Path) -> None:
    m = manifest(tmp_path, b"payload")
    assert m.dir == cache.stage_dir(tmp_path, "up", m.key)
    assert m.files == {"a.bin": files.sha256_file(m.dir / "a.bin")}
    assert cache.load_intact(m.dir) == m
    (m.dir / "a.bin").write_bytes(b"tampered")
    assert cache.load_intact(m.dir) is None
    (m.dir / "a.bin").unlink()
    assert cache.load_intact(m.dir) is None


def test_a_failing_stage_leaves_nothing_behind(tmp_path: Path) -> None:
    def work(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        cache.build(tmp_path, "broken", "tasks.calibrate", [], work)
    assert list((tmp_path / "broken").iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2})
    assert files.read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
