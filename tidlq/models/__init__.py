"""The float models: built-in architectures, user models and their checks, the training loop."""
