"""Compression: ONNX export (`mk export-onnx`), quantization (`mk quant`) and structured
pruning (`mk prune`)."""
