"""S3 through boto3: publish a run's outputs with a SHA-256 checksum per object, verified after upload, and fetch
`s3://` inputs into a local cache keyed by their ETag.

The endpoint comes from `storage.endpoint_url` or `AWS_ENDPOINT_URL`; credentials only from the standard AWS chain
(environment, shared files, instance roles), never from params. Transient errors are retried by botocore's standard
retry mode (exponential backoff); what is left is raised as a `StorageError` that names the endpoint and the bucket.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import files
from tasks.errors import UserError
from tasks.params import BUCKET_NAME, StorageParams

COMPLETE = "_complete.json"  # uploaded last: lists every object and its SHA-256; a prefix without it is incomplete


class StorageError(UserError):
    """S3 refused the request (credentials, bucket, object)."""


class StorageUnreachable(StorageError):
    """S3 could not be reached (a transient error worth retrying)."""


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


def client(endpoint_url: str | None = None, attempts: int = 3) -> Any:
    """A boto3 S3 client with short connect timeouts and standard retries (backoff on transient errors)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=3, read_timeout=30,
                    request_checksum_calculation="when_supported", response_checksum_validation="when_supported")
    # A new session each time: the default session caches credentials, and the environment may have changed.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                                          config=config)


def endpoint_of(s3: Any) -> str:
    """The endpoint a client talks to, for messages."""
    return s3.meta.endpoint_url


def check_bucket(s3: Any, bucket: str) -> None:
    """Fail fast, with a clear message, when the bucket cannot be reached or used."""
    _call(s3, bucket, "head_bucket", Bucket=bucket)


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
    _call(s3, bucket, "put_object", Bucket=bucket, Key=f"{prefix}/{COMPLETE}", Body=marker,
          ChecksumSHA256=_b64_sha256(marker))
    return uploaded


def put_verified(s3: Any, path: Path, bucket: str, key: str) -> str:
    """Put one file with its SHA-256 checksum unless an identical object is there; verify it; return the digest."""
    digest = files.sha256_file(path)
    if remote_sha256(s3, bucket, key) == digest:
        return digest
    with open(path, "rb") as body:
        _call(s3, bucket, "put_object", Bucket=bucket, Key=key, Body=body, ChecksumSHA256=_b64_sha256_file(path),
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
        raise _explain(exc, s3, bucket) from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise _explain(exc, s3, bucket) from None
    return head.get("Metadata", {}).get("sha256")


def fetch(uri: str, cache_dir: Path, field: str) -> Path:
    """The local copy of `s3://bucket/key`, downloaded once into `cache_dir/<etag digest>/` (atomic rename)."""
    bucket, key = split_uri(uri, field)
    s3 = client()
    head = _call(s3, bucket, "head_object", Bucket=bucket, Key=key, missing=f"{field} {uri!r} does not exist")
    etag = head["ETag"].strip('"')
    target = Path(cache_dir) / hashlib.sha256(f"{uri}\0{etag}".encode()).hexdigest()[:24] / Path(key).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        _call(s3, bucket, "download_file", Bucket=bucket, Key=key, Filename=str(tmp))
        os.replace(tmp, target)
    return target


def etag(uri: str, field: str) -> str:
    """The ETag of an `s3://` object (its content fingerprint, without downloading it)."""
    bucket, key = split_uri(uri, field)
    s3 = client()
    head = _call(s3, bucket, "head_object", Bucket=bucket, Key=key, missing=f"{field} {uri!r} does not exist")
    return head["ETag"].strip('"')


def split_uri(uri: str, field: str) -> tuple[str, str]:
    """("bucket", "key") of `s3://bucket/key`; no '.' or '..' parts (the key's last part names the cached file)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise UserError(f"{field} {uri!r} is not an object URI; expected s3://bucket/path/to/file")
    if not BUCKET_NAME.fullmatch(bucket) or {".", ".."} & set(key.split("/")) or "\0" in key:
        raise UserError(f"{field} {uri!r}: a bucket name (lowercase letters, digits, '.', '-') and a key without "
                        "'.' or '..' parts are needed; expected s3://bucket/path/to/file")
    return bucket, key


def _call(s3: Any, bucket: str, method: str, missing: str | None = None, **kwargs: Any) -> Any:
    from botocore.exceptions import ClientError

    try:
        return getattr(s3, method)(**kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if missing and code in ("404", "NoSuchKey", "NotFound"):
            raise StorageError(f"{missing} at {endpoint_of(s3)}. Check the URI.") from None
        raise _explain(exc, s3, bucket) from None
    except Exception as exc:  # noqa: BLE001 - EndpointConnectionError, timeouts, SSL errors ...
        raise _explain(exc, s3, bucket) from None


def _explain(exc: Exception, s3: Any, bucket: str) -> StorageError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"S3 at {endpoint_of(s3)}, bucket {bucket!r}"
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{where}: no credentials. Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile).")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",) or (code == "404" and exc.operation_name == "HeadBucket"):
            return StorageError(f"{where}: the bucket does not exist. Create it, or set storage.bucket / "
                                "TIDLQ_S3_BUCKET to an existing one.")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(f"{where}: access refused ({code}). Check the AWS credentials in the environment.")
        return StorageError(f"{where}: {code or 'error'}: {exc}")
    return StorageUnreachable(f"{where} cannot be reached ({type(exc).__name__}: {exc}). Is the server running, "
                              "and AWS_ENDPOINT_URL right?")


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _b64_sha256_file(path: Path) -> str:
    return base64.b64encode(bytes.fromhex(files.sha256_file(path))).decode()
