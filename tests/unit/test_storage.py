"""S3 publishing and s3:// inputs, against moto's in-process S3 (the real server is in the integration tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moto import mock_aws

from tidlq.core import files, inputs
from tidlq.core import s3 as s3lib
from tidlq.core.errors import UserError
from tidlq.core.params import StorageParams
from tidlq.results import storage


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = s3lib.client()
        client.create_bucket(Bucket="bucket")
        yield client


def tree(root: Path) -> Path:
    (root / "tidl").mkdir(parents=True)
    (root / "summary.json").write_text('{"a": 1}')
    (root / "tidl" / "model.onnx").write_bytes(bytes(range(256)) * 100)
    return root


def test_upload_tree_verifies_every_object_and_marks_completion(s3, tmp_path: Path) -> None:
    local = tree(tmp_path / "out")
    uploaded = storage.upload_tree(s3, local, "bucket", "tidlq/m/run1")
    assert uploaded == {"tidlq/m/run1/summary.json": files.sha256_file(local / "summary.json"),
                        "tidlq/m/run1/tidl/model.onnx": files.sha256_file(local / "tidl" / "model.onnx")}
    for key, digest in uploaded.items():
        assert storage.remote_sha256(s3, "bucket", key) == digest
        body = s3.get_object(Bucket="bucket", Key=key)["Body"].read()
        assert files.sha256_file(local / key.removeprefix("tidlq/m/run1/")) == digest
        assert len(body) == (local / key.removeprefix("tidlq/m/run1/")).stat().st_size
    marker = s3.get_object(Bucket="bucket", Key=f"tidlq/m/run1/{storage.COMPLETE}")["Body"].read()
    assert json.loads(marker)["objects"] == uploaded


def test_reupload_sends_only_what_changed(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tree(tmp_path / "out")
    storage.upload_tree(s3, local, "bucket", "p")
    sent: list[str] = []
    real = s3.put_object
    monkeypatch.setattr(s3, "put_object", lambda **kw: sent.append(kw["Key"]) or real(**kw))
    (local / "summary.json").write_text('{"a": 2}')
    storage.upload_tree(s3, local, "bucket", "p")
    assert sent == ["p/summary.json", f"p/{storage.COMPLETE}"]


def test_upload_refuses_an_object_that_does_not_match(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tree(tmp_path / "out")
    monkeypatch.setattr(storage, "remote_sha256", lambda *a: "0" * 64)
    with pytest.raises(s3lib.StorageError, match="does not match the local file after upload"):
        storage.upload_tree(s3, local, "bucket", "p")


def test_missing_bucket_names_endpoint_and_bucket(s3) -> None:
    with pytest.raises(s3lib.StorageError, match=r"bucket 'nope': the bucket does not exist"):
        s3lib.check_bucket(s3, "nope")


def test_unreachable_endpoint_is_a_transient_error(s3) -> None:
    with pytest.raises(s3lib.StorageUnreachable, match=r"http://127.0.0.1:9.*cannot be reached"):
        storage.preflight(storage.Destination("bucket", "p", "http://127.0.0.1:9"))


def test_destination_from_params_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDLQ_S3_BUCKET", raising=False)
    assert storage.destination(StorageParams(), "m", "r") is None
    monkeypatch.setenv("TIDLQ_S3_BUCKET", "envbucket")
    assert storage.destination(StorageParams(prefix="/x/"), "m", "r").uri == "s3://envbucket/x/m/r/"
    assert storage.destination(StorageParams(bucket="b"), "m", "r").uri == "s3://b/tidlq/m/r/"


def test_s3_inputs_are_fetched_once_and_fingerprinted_by_etag(s3, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDLQ_CACHE_DIR", str(tmp_path / "cache"))
    s3.put_object(Bucket="bucket", Key="data/d.npz", Body=b"first")
    uri = "s3://bucket/data/d.npz"
    first = inputs.resolve(uri, "data.source")
    assert first.read_bytes() == b"first" and first.name == "d.npz"
    fp = inputs.fingerprint(uri, "data.source")
    calls: list[str] = []
    real = s3lib.call
    monkeypatch.setattr(s3lib, "call", lambda s, b, method, **kw: calls.append(method) or real(s, b, method, **kw))
    assert inputs.resolve(uri, "data.source") == first
    assert calls == ["head_object"]  # the ETag is unchanged: no second download
    s3.put_object(Bucket="bucket", Key="data/d.npz", Body=b"second")
    assert inputs.fingerprint(uri, "data.source") != fp
    assert inputs.resolve(uri, "data.source").read_bytes() == b"second"


@pytest.mark.parametrize(("uri", "message"), [("s3://bucket/missing.npz", "does not exist"),
                                               ("s3://bucket/", "not an object URI"), ("s3://", "not an object")])
def test_bad_s3_inputs(s3, uri: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        inputs.resolve(uri, "data.source")
