"""Graph passes: normalize an exported CNN, find its Conv+ReLU sites, rewrite them.

Each pass takes a model and returns (model, modified), onnx_ir / torch.fx style, and names
itself in its errors. Import from the submodules, e.g. `from onnxzero.passes.normalize
import normalize`; this package imports nothing itself so that `import onnxzero.passes.x`
stays cheap.
"""
