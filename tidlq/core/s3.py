"""S3 through boto3, for the whole tree: the one client factory, readable errors that name the endpoint and the
bucket, and `s3://` inputs fetched into a local cache keyed by their ETag.

The endpoint comes from the caller (`storage.endpoint_url`) or `AWS_ENDPOINT_URL`; credentials only from the standard
AWS chain (environment, shared files, instance roles), never from params. Transient errors are retried by botocore's
standard retry mode (exponential backoff); what is left is raised as a `StorageError`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tidlq.core import files
from tidlq.core.errors import UserError

BUCKET_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")  # S3 wants 3-63; no "/" is what matters here


class StorageError(UserError):
    """S3 refused the request (credentials, bucket, object)."""


class StorageUnreachable(StorageError):
    """S3 could not be reached (a transient error worth retrying)."""


def client(endpoint_url: str | None = None, attempts: int = 3, timeout: float = 30.0,
           keys: Mapping[str, str] | None = None) -> Any:
    """The S3 client of the whole tree: boto3 with short connect timeouts and standard retries (backoff on transient
    errors). Credentials come from the AWS chain; `keys` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION) only for the local stack's own servers."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    # S3-compatible servers at an endpoint (SeaweedFS as `http://seaweedfs:8333` in compose) want path-style URLs:
    # virtual-hosted style would look up the host `<bucket>.seaweedfs`.
    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=min(3.0, timeout),
                    read_timeout=timeout, request_checksum_calculation="when_supported",
                    response_checksum_validation="when_supported",
                    s3={"addressing_style": "path" if endpoint_url else "auto"})
    keys = keys or {}
    # A new session each time: the default session caches credentials, and the environment may have changed.
    session = boto3.session.Session(aws_access_key_id=keys.get("AWS_ACCESS_KEY_ID"),
                                    aws_secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY"),
                                    region_name=keys.get("AWS_DEFAULT_REGION"))
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def endpoint_of(s3: Any) -> str:
    """The endpoint a client talks to, for messages."""
    return s3.meta.endpoint_url


def check_bucket(s3: Any, bucket: str) -> None:
    """Fail fast, with a clear message, when the bucket cannot be reached or used."""
    call(s3, bucket, "head_bucket", Bucket=bucket)


def fetch(uri: str, cache_dir: Path, field: str) -> Path:
    """The local copy of `s3://bucket/key`, downloaded once into `cache_dir/<etag digest>/` (atomic rename)."""
    bucket, key = split_uri(uri, field)
    s3 = client()
    head = call(s3, bucket, "head_object", Bucket=bucket, Key=key, missing=f"{field} {uri!r} does not exist")
    etag = head["ETag"].strip('"')
    target = Path(cache_dir) / hashlib.sha256(f"{uri}\0{etag}".encode()).hexdigest()[:24] / Path(key).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        call(s3, bucket, "download_file", Bucket=bucket, Key=key, Filename=str(tmp))
        os.replace(tmp, target)
    return target


def etag(uri: str, field: str) -> str:
    """The ETag of an `s3://` object (its content fingerprint, without downloading it)."""
    bucket, key = split_uri(uri, field)
    s3 = client()
    head = call(s3, bucket, "head_object", Bucket=bucket, Key=key, missing=f"{field} {uri!r} does not exist")
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


def call(s3: Any, bucket: str, method: str, missing: str | None = None, **kwargs: Any) -> Any:
    """`s3.<method>(**kwargs)`; a StorageError naming the endpoint and bucket (`missing`: the message for a 404)."""
    from botocore.exceptions import ClientError

    try:
        return getattr(s3, method)(**kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if missing and code in ("404", "NoSuchKey", "NotFound"):
            raise StorageError(f"{missing} at {endpoint_of(s3)}. Check the URI.") from None
        raise explain(exc, s3, bucket) from None
    except Exception as exc:  # noqa: BLE001 - EndpointConnectionError, timeouts, SSL errors ...
        raise explain(exc, s3, bucket) from None


def explain(exc: Exception, s3: Any, bucket: str) -> StorageError:
    """The StorageError that says what an S3 failure means and what to do."""
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


def b64_sha256(data: bytes) -> str:
    """The base64 SHA-256 S3 takes as ChecksumSHA256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def b64_sha256_file(path: Path) -> str:
    """The base64 SHA-256 of a file."""
    return base64.b64encode(bytes.fromhex(files.sha256_file(path))).decode()
