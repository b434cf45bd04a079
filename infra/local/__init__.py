"""The local stack: SeaweedFS (S3), an MLflow server and a Prefect server on 127.0.0.1, started and stopped by PID."""
