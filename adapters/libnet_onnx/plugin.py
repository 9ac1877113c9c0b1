"""libnet plugin entry point of the ONNX adapter (import-light: onnx/onnxruntime are imported lazily)."""
