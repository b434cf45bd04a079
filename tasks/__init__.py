"""tidlq stages: one module per pipeline stage, each a pure `run(...)` plus a thin Prefect task."""
