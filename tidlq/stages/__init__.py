"""The pipeline stages: one module per stage of `tidlq.graph`, each a pure `run(*params, *input_folders, out)`."""
