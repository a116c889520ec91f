"""Compression: ONNX export (`mk export-onnx`) and quantization (`mk quant`)."""
