"""Runtime: stage backends (ONNX Runtime, TensorRT), the early-exit pipeline, streaming sources, benchmark. Never imports torch or dmpo_edge.compile."""
