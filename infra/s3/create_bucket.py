"""Create the tidlq bucket if it does not exist: the one-shot `create-bucket` service of infra/docker-compose.yml.

Reads the standard AWS variables and the bucket name from the environment:

    TIDLQ_S3_BUCKET        the bucket (required)
    AWS_ENDPOINT_URL       the S3 endpoint (unset: AWS S3 itself)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (default us-east-1)

Idempotent: an existing bucket owned by these credentials is success. Retries while the endpoint is not reachable
yet (up to TIDLQ_S3_WAIT_SECONDS, default 60). Exit code 0 when the bucket exists afterwards, 1 otherwise, with the
reason on stderr. Secrets are never printed.

Usage: python infra/s3/create_bucket.py   (in the worker image: the image's WORKDIR is the project)
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    from tidlq.core import s3

    bucket = os.environ.get("TIDLQ_S3_BUCKET", "").strip()
    if not bucket:
        print("create_bucket: TIDLQ_S3_BUCKET is not set", file=sys.stderr)
        return 1
    region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    client = s3.client(endpoint, attempts=3, keys={"AWS_DEFAULT_REGION": region})
    where = f"s3://{bucket} at {endpoint or 'AWS S3'}"
    deadline = time.monotonic() + float(os.environ.get("TIDLQ_S3_WAIT_SECONDS", "60"))
    while True:
        try:
            client.head_bucket(Bucket=bucket)
            print(f"create_bucket: {where} exists")
            return 0
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:  # 403: the bucket exists but belongs to someone else, or the keys are wrong
                print(f"create_bucket: {where}: {exc.response.get('Error', {}).get('Code', status)}", file=sys.stderr)
                return 1
            break
        except (EndpointConnectionError, BotoCoreError) as exc:
            if time.monotonic() > deadline:
                print(f"create_bucket: {where} not reachable: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code != "BucketAlreadyOwnedByYou":
            print(f"create_bucket: creating {where} failed: {code}", file=sys.stderr)
            return 1
    print(f"create_bucket: {where} created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
