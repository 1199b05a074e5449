"""Compile: stage split, ONNX export, simplify, precision (FP16/INT8), bundle writer, TensorRT builders."""
