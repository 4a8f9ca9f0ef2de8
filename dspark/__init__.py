"""dspark: lossless speculative decoding over exported ONNX / TensorRT graphs."""

__version__ = "0.4.5"
