"""Benchmarks: wall-clock ratios against onnxruntime measured in the same run."""
