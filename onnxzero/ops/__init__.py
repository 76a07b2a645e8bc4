"""Python side of the custom ops: one module per op.

Each module holds the op's numpy reference implementation (which defines its
semantics and is what the tests compare the C++ kernel against), the helpers
that prepare its extra inputs (masks, predictors, compressed weights), and
`make_node`, which builds the ONNX node in onnxzero's domain.

Every op replaces Conv(+bias)+ReLU and shares the Conv contract: inputs
X (N,C,H,W) float32, W (K,C/group,KH,KW) constant, B (K,) optional constant,
the Conv attributes (kernel_shape, strides, pads, dilations, group, auto_pad),
output 0 Y (N,K,OH,OW), and optional output 1 `macs`: an int64 scalar with the
multiply-accumulates the kernel actually performed in that run (whole batch).
"""

from onnxzero.ops.session import conv_geometry, make_session, single_op_model

__all__ = ["conv_geometry", "make_session", "single_op_model"]
