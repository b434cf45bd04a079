"""tidlq: PyTorch models to TIDL-ready INT8 QDQ ONNX models, as a pipeline of cached stages (ARCHITECTURE.md)."""
