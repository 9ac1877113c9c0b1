"""ONNX Runtime layer-probe adapter for libnet-plugin (install with ``pip install 'libnet-plugin[onnx]'``)."""
