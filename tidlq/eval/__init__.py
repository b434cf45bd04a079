"""Measuring a model in onnxruntime: logits, SQNR, agreement; quantized layers inside a QDQ model."""
