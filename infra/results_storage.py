"""Prefect result storage in S3, so that a stage one worker computed is a cache hit for every other worker.

`create_block` saves a prefect-aws `S3Bucket` block on the Prefect server (`PREFECT_API_URL`). Its credentials
block holds no keys: each worker reads them from its own AWS chain (environment, profile, role). Workers then run
with `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/<name>`.
"""

from __future__ import annotations


def create_block(bucket: str, folder: str = "prefect-results", endpoint_url: str | None = None,
                 name: str = "tidlq-results") -> str:
    """Save the S3 result-storage block (and its key-less credentials block); the value for
    PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url))
    credentials.save(f"{name}-credentials", overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials).save(name, overwrite=True)
    return f"s3-bucket/{name}"
