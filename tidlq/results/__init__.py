"""What a run leaves: the summary and report, the published folder, MLflow, S3, the nightly verdicts."""
