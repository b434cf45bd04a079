"""Prefect result storage in S3, so that a stage one worker computed is a cache hit for every other worker.

`create_block` saves a prefect-aws `S3Bucket` block on the Prefect server (`PREFECT_API_URL`) and makes it the
server's default result storage: every flow run against that server, on any worker, then persists and looks up its
cached results there, with nothing to configure per worker. The block's credentials hold no keys: each worker reads
them from its own AWS chain (environment, profile, role).
"""

from __future__ import annotations

import os

from tidlq.core.errors import UserError


def configure_from_env(name: str = "tidlq-results") -> tuple[str, str, str]:
    """`create_block` for the stack in the environment (TIDLQ_S3_BUCKET, AWS_ENDPOINT_URL, PREFECT_API_URL, as
    `.stack/env` sets them); (block slug, server URL, bucket)."""
    bucket = os.environ.get("TIDLQ_S3_BUCKET")
    server = os.environ.get("PREFECT_API_URL")
    if not bucket or not server:
        raise UserError("results-storage needs TIDLQ_S3_BUCKET and PREFECT_API_URL (source .stack/env).")
    return create_block(bucket, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"), name=name), server, bucket


def create_block(bucket: str, folder: str = "prefect-results", endpoint_url: str | None = None,
                 name: str = "tidlq-results") -> str:
    """Save the S3 result-storage block (and its key-less credentials block) and make it the server's default
    result storage; return its slug (`s3-bucket/<name>`)."""
    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url))
    credentials.save(f"{name}-credentials", overwrite=True)
    block_id = S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials).save(name, overwrite=True)
    with get_client(sync_client=True) as client:
        client.update_server_default_result_storage(block_id)
    return f"s3-bucket/{name}"


def clear_default() -> None:
    """Go back to local result storage on every worker (the block itself stays)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.clear_server_default_result_storage()
