"""The stage cache: keys that change exactly when code, params, library versions or input contents change; atomic
folders; integrity checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from tidlq.core import cache, files
from tidlq.core.params import QatParams, QuantParams


def build(root: Path, stage: str, args: list, work) -> cache.Manifest:
    """Run `work` into the content-addressed folder of `stage` (run by tidlq.stages.calibrate) for `args`."""
    key = cache.stage_key(stage, "tidlq.stages.calibrate", args)
    return cache.write_stage(cache.stage_dir(root, stage, key), stage, key, work)


def manifest(tmp_path: Path, content: bytes, name: str = "up") -> cache.Manifest:
    def work(out: Path) -> dict:
        (out / "a.bin").write_bytes(content)
        return {"size": len(content)}

    return build(tmp_path, name, [content.hex()], work)


def test_key_depends_on_params_inputs_and_stage(tmp_path: Path) -> None:
    up = manifest(tmp_path, b"one")
    key = cache.stage_key("calibrate", "tidlq.stages.calibrate", [QuantParams(), up])
    assert key == cache.stage_key("calibrate", "tidlq.stages.calibrate", [QuantParams(), up])
    assert key != cache.stage_key("calibrate", "tidlq.stages.calibrate", [QuantParams(calibration_batches=3), up])
    assert key != cache.stage_key("convert", "tidlq.stages.calibrate", [QuantParams(), up])
    other = manifest(tmp_path, b"two")
    assert key != cache.stage_key("calibrate", "tidlq.stages.calibrate", [QuantParams(), other])


def test_key_ignores_where_an_input_lives(tmp_path: Path) -> None:
    a = manifest(tmp_path / "a", b"same")
    b = manifest(tmp_path / "b", b"same")
    assert a.dir != b.dir
    convert = "tidlq.stages.convert"
    assert cache.stage_key("convert", convert, [a]) == cache.stage_key("convert", convert, [b])


def test_code_digest_follows_project_imports() -> None:
    closure = cache._project_closure("tidlq.stages.train_qat")
    assert {"tidlq.stages.train_qat", "tidlq.models.training", "tidlq.quant.fx", "tidlq.quant.recipes",
            "tidlq.models.networks", "tidlq.data.dataset", "tidlq.core.files"} <= closure
    assert "tidlq.stages.tidl_bundle" not in closure
    assert "tidlq.core.params" not in closure  # imported for type checkers only; its values are in the key
    assert cache.code_digest("tidlq.stages.train_qat") != cache.code_digest("tidlq.stages.calibrate")


def test_code_change_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache.stage_key("train_qat", "tidlq.stages.train_qat", [QatParams()])
    unrelated = cache.stage_key("tidl_bundle", "tidlq.stages.tidl_bundle", [])
    edited = tmp_path / "training.py"
    edited.write_text(cache._source_path("tidlq.models.training").read_text() + "\n# an edit\n")
    real = cache._source_path
    monkeypatch.setattr(cache, "_source_path", lambda m: edited if m == "tidlq.models.training" else real(m))
    cache.code_digest.cache_clear()
    try:
        assert cache.stage_key("train_qat", "tidlq.stages.train_qat", [QatParams()]) != before
        assert cache.stage_key("tidl_bundle", "tidlq.stages.tidl_bundle", []) == unrelated
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
        build(tmp_path, "broken", [], work)
    assert [p for p in (tmp_path / "broken").iterdir() if p.suffix != ".lock"] == []


def test_the_same_key_is_built_once_when_two_build_it_at_once(tmp_path: Path) -> None:
    calls = []
    results: list[cache.Manifest] = []

    def work(out: Path) -> dict:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the other builder arrives while this one works
        (out / "a.bin").write_bytes(b"once")
        return {"n": 1}

    def builder() -> None:
        results.append(build(tmp_path, "same", [], work))

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] == cache.load_intact(results[0].dir)


def test_writers_of_one_folder_take_turns(tmp_path: Path) -> None:
    """Replacing a folder takes two renames; writers racing on them must neither fail nor leave it missing."""
    final, errors = tmp_path / "published", []

    def writer(n: int) -> None:
        try:
            for i in range(30):
                with files.atomic_dir(final) as tmp:
                    (tmp / "who").write_text(f"{n}-{i}")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (final / "who").read_text().endswith("-29")
    assert [p.name for p in tmp_path.iterdir() if p != final and p.suffix != ".lock"] == []


def test_different_keys_do_not_wait_on_each_other(tmp_path: Path) -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow(out: Path) -> dict:
        inside.set()
        assert release.wait(10)
        return {}

    thread = threading.Thread(target=build, args=(tmp_path, "k", ["one"], slow))
    thread.start()
    assert inside.wait(10)
    other = build(tmp_path, "k", ["two"], lambda out: {"other": True})  # no wait
    release.set()
    thread.join()
    assert other.info == {"other": True}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_folders_of_dead_writers_are_swept(tmp_path: Path) -> None:
    final = tmp_path / "stage" / "0123456789abcdef"
    final.parent.mkdir()
    mine = files.temp_prefix(final)
    dead = final.parent / (mine.replace(f".p{os.getpid()}@", f".p{dead_pid()}@") + "x1.tmp")
    alive = final.parent / f"{mine}x2.tmp"
    elsewhere = final.parent / (mine.rsplit("@", 1)[0] + "@otherhost.x3.tmp")
    for folder in (dead, alive, elsewhere):
        (folder / "half").mkdir(parents=True)
    m = cache.write_stage(final, "stage", "k" * 64, lambda out: {"a": (out / "a").write_bytes(b"a")})
    assert cache.load_intact(m.dir) == m
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists()  # a live writer's, another host's: not ours to remove


def test_a_killed_lock_holder_does_not_block_the_next_build(tmp_path: Path) -> None:
    lock_file = tmp_path / ".x.lock"
    script = (f"import time; from filelock import FileLock; lock = FileLock({str(lock_file)!r}); lock.acquire(); "
              "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Timeout):
            FileLock(lock_file, timeout=0.2).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with FileLock(lock_file, timeout=5):  # flock: the kernel released it with the process
            pass
        assert files.lock(tmp_path / "x").lock_file == str(lock_file)
    finally:
        holder.kill()
        holder.wait()


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2})
    assert files.read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
