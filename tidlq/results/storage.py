"""Publishing a run's outputs to S3: every object with its SHA-256 checksum (checked by S3 and verified after
upload), then `_complete.json`; a prefix without it is incomplete. The client and the errors are `tidlq.core.s3`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.core.params import StorageParams
from tidlq.core.s3 import (
    BUCKET_NAME,
    StorageError,
    StorageUnreachable,
    b64_sha256,
    b64_sha256_file,
    call,
    check_bucket,
    client,
    endpoint_of,
    explain,
)

COMPLETE = "_complete.json"  # uploaded last: lists every object and its SHA-256; a prefix without it is incomplete


@dataclass(frozen=True)
class Destination:
    """Where a run's outputs go: `s3://bucket/prefix/`."""

    bucket: str
    prefix: str
    endpoint_url: str | None

    @property
    def uri(self) -> str:
        """The destination as an s3:// URI."""
        return f"s3://{self.bucket}/{self.prefix}/"


def destination(storage: StorageParams, model: str, run_id: str) -> Destination | None:
    """`s3://<bucket>/<prefix>/<model>/<run id>/`, or None when no bucket is set (params or TIDLQ_S3_BUCKET)."""
    bucket = storage.bucket or os.environ.get("TIDLQ_S3_BUCKET")
    if not bucket:
        return None
    if not BUCKET_NAME.fullmatch(bucket):  # storage.bucket is checked by the params; the variable is not
        raise UserError(f"TIDLQ_S3_BUCKET {bucket!r} is not an S3 bucket name: use lowercase letters, digits, "
                        "'.' and '-'.")
    return Destination(bucket, f"{storage.prefix.strip('/')}/{model}/{run_id}", storage.endpoint_url)


def preflight(dest: Destination | None) -> None:
    """Before any work: the bucket is reachable and usable with the credentials at hand."""
    if dest is not None:
        check_bucket(client(dest.endpoint_url, attempts=2), dest.bucket)


def publish(dest: Destination, local: Path) -> dict[str, Any]:
    """Upload a published output folder to its destination, verified; return the URI and the objects."""
    objects = upload_tree(client(dest.endpoint_url), local, dest.bucket, dest.prefix)
    return {"uri": dest.uri, "objects": len(objects)}


@task(name="upload", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3,
      retry_condition_fn=lambda task, run, state: _is_unreachable(state))
def upload_task(dest: Destination, local: Path) -> dict[str, Any]:
    """Prefect task around `publish`: never cached; retried only when S3 could not be reached."""
    return publish(dest, local)


def _is_unreachable(state: Any) -> bool:
    try:
        state.result()
    except StorageUnreachable:
        return True
    except Exception:  # noqa: BLE001 - any other failure is not transient
        return False
    return False


def upload_tree(s3: Any, local: Path, bucket: str, prefix: str) -> dict[str, str]:
    """Upload every file under `local` to `s3://bucket/prefix/`, each with its SHA-256 (checked by S3 and verified
    after upload), then `_complete.json`. Objects already there with the same SHA-256 are not sent again.
    Returns {key: sha256}."""
    prefix = prefix.strip("/")
    uploaded = {}
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}"
        uploaded[key] = put_verified(s3, path, bucket, key)
    marker = files.canonical_json({"objects": uploaded}).encode()
    call(s3, bucket, "put_object", Bucket=bucket, Key=f"{prefix}/{COMPLETE}", Body=marker,
          ChecksumSHA256=b64_sha256(marker))
    return uploaded


def put_verified(s3: Any, path: Path, bucket: str, key: str) -> str:
    """Put one file with its SHA-256 checksum unless an identical object is there; verify it; return the digest."""
    digest = files.sha256_file(path)
    if remote_sha256(s3, bucket, key) == digest:
        return digest
    with open(path, "rb") as body:
        call(s3, bucket, "put_object", Bucket=bucket, Key=key, Body=body, ChecksumSHA256=b64_sha256_file(path),
              Metadata={"sha256": digest})
    if remote_sha256(s3, bucket, key) != digest:
        raise StorageError(f"s3://{bucket}/{key} at {endpoint_of(s3)} does not match the local file after upload "
                           f"(sha256 {digest}); run again to upload it anew.")
    return digest


def remote_sha256(s3: Any, bucket: str, key: str) -> str | None:
    """The SHA-256 recorded with an object, or None when the object is not there."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise explain(exc, s3, bucket) from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise explain(exc, s3, bucket) from None
    return head.get("Metadata", {}).get("sha256")


