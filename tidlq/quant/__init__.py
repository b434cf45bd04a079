"""Quantization: recipes and presets, observers, the FX graph mode steps, bias correction, the ONNX export."""
