"""ConvRelu: dense Conv(+bias)+ReLU, the no-skip baseline every skipping op is measured against.

The kernel (runtime_ops/src/conv_relu.cc) runs on MLAS's direct-convolution kernels (the ones
onnxruntime's own Conv uses; runtime_ops/src/nchwc.h) where they serve the shape (group 1, K % 8 == 0,
C % 8 == 0 or C < 8), else on the packed AVX2/FMA GEMM core (gemm.h); see docs/design-kernels.md. Inputs X (N,C,H,W), W (K,C/group,KH,KW) constant, B (K,) optional constant;
attributes exactly ONNX Conv's; output 0 Y = ReLU(conv), optional output 1 `macs` (int64 scalar) =
N * K * OH * OW * (C/group) * KH * KW.

Residual sites (Conv -> Add(other) -> Relu): the optional last input `other` (N, K, OH, OW), a run-time
tensor, makes Y = ReLU(conv + B + other); it adds no MACs.

Attribute `relu` (int, default 1): 0 drops the activation, Y = conv + B [+ other]: the dense op for
the Convs of a chain that are not sites (projection shortcuts), so passes/chain_layout.py can keep
the whole chain in onnxzero ops with blocked tensors between them.

`conv2d` here is the straightforward numpy (im2col, float64) convolution the other ops' references
build on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxzero.ops.spec import OPS
from onnxzero.ops.session import ConvGeometry, conv_geometry

OP = "ConvRelu"


def _ints(v, n, name):
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"{name} needs {n} values, got {v}")
    return v


def geometry(x_shape, w_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
             auto_pad: str = "NOTSET", kernel_shape=None) -> ConvGeometry:
    """conv_geometry with the same argument checks as the kernels (channel count, group)."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"expected 4-D X and W, got {tuple(x_shape)} and {tuple(w_shape)}")
    if kernel_shape is not None and tuple(kernel_shape) != tuple(w_shape[2:]):
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} does not match W {tuple(w_shape)}")
    if w_shape[0] % group or x_shape[1] != w_shape[1] * group:
        raise ValueError(f"X {tuple(x_shape)} / W {tuple(w_shape)} do not match group={group}")
    return conv_geometry(x_shape, w_shape, strides=_ints(strides, 2, "strides"), pads=_ints(pads, 4, "pads"),
                         dilations=_ints(dilations, 2, "dilations"), group=group, auto_pad=auto_pad)


def im2col(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """(N, C, H, W) -> (N, C*KH*KW, OH*OW) columns, zero padded, in float64 (q = (c, r, s) order)."""
    N = x.shape[0]
    pt, pl, pb, pr = g.pads
    xp = np.zeros((N, g.C, g.H + pt + pb, g.W + pl + pr), np.float64)
    xp[:, :, pt:pt + g.H, pl:pl + g.W] = x
    cols = np.empty((N, g.C, g.KH, g.KW, g.OH, g.OW), np.float64)
    sh, sw = g.strides
    dh, dw = g.dilations
    for r in range(g.KH):
        for s in range(g.KW):
            cols[:, :, r, s] = xp[:, :, r * dh: r * dh + (g.OH - 1) * sh + 1: sh, s * dw: s * dw + (g.OW - 1) * sw + 1: sw]
    return cols.reshape(N, g.C * g.KH * g.KW, g.OH * g.OW)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, **conv_attrs) -> np.ndarray:
    """Plain Conv (no ReLU), float64: (N, K, OH, OW)."""
    x = np.asarray(x)
    w = np.asarray(w)
    g = geometry(x.shape, w.shape, **conv_attrs)
    cols = im2col(x, g)  # (N, C*R*S, P)
    G, Kg, Cg = g.group, g.K // g.group, g.C // g.group
    crs = Cg * g.KH * g.KW
    wm = w.astype(np.float64).reshape(G, Kg, crs)
    y = np.empty((x.shape[0], g.K, g.OH * g.OW), np.float64)
    for grp in range(G):
        y[:, grp * Kg:(grp + 1) * Kg] = np.einsum("kq,nqp->nkp", wm[grp], cols[:, grp * crs:(grp + 1) * crs])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None]
    return y.reshape(x.shape[0], g.K, g.OH, g.OW)


def check_other(other: np.ndarray | None, y_shape, op: str = OP) -> np.ndarray | None:
    """`other` as float64, refused (naming op, input and both shapes) unless it has the output's shape."""
    if other is None:
        return None
    other = np.asarray(other)
    if other.shape != tuple(y_shape):
        raise ValueError(f"{op}: input 'other' has shape {other.shape}, expected {tuple(y_shape)} (the conv output's shape)")
    return other.astype(np.float64)


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, other: np.ndarray | None = None,
              relu: bool = True, **conv_attrs) -> tuple[np.ndarray, int]:
    """ConvRelu's semantics: (ReLU(conv(x, w) + b [+ other]) as float32, MACs = N * dense MACs per image);
    relu=False: without the ReLU."""
    y = conv2d(x, w, b, **conv_attrs)
    o = check_other(other, y.shape)
    if o is not None:
        y = y + o
    g = geometry(np.shape(x), np.shape(w), **conv_attrs)
    return (np.maximum(y, 0) if relu else y).astype(np.float32), int(np.shape(x)[0]) * g.macs


def conv_attributes(*, kernel_shape: Sequence[int] | None = None, strides: Sequence[int] | None = None,
                    pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None,
                    group: int | None = None, auto_pad: str | None = None) -> dict:
    """The ONNX Conv attributes that are set (None = ONNX default, left out)."""
    attrs: dict = {}
    if kernel_shape is not None:
        attrs["kernel_shape"] = [int(v) for v in kernel_shape]
    if strides is not None:
        attrs["strides"] = [int(v) for v in strides]
    if pads is not None and auto_pad in (None, "NOTSET"):
        attrs["pads"] = [int(v) for v in pads]
    if dilations is not None:
        attrs["dilations"] = [int(v) for v in dilations]
    if group is not None:
        attrs["group"] = int(group)
    if auto_pad is not None and auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    return attrs


def make_node(x: str, w_name: str, b_name: str | None, y: str, *, macs_output: str | None = None,
              kernel_shape: Sequence[int] | None = None, strides: Sequence[int] | None = None,
              pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None, group: int | None = None,
              auto_pad: str | None = None, name: str | None = None,
              other: str | None = None, x_blocked: bool = False, other_blocked: bool = False,
              y_blocked: bool = False, relu: bool = True) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """A ConvRelu node in onnxzero's domain; ConvRelu needs no extra initializers (returns {}).

    other: the residual operand's tensor name (a residual site), the node's last input.
    relu: False sets attribute relu=0 (no activation: a plain Conv(+B)(+other)).
    x_blocked / other_blocked / y_blocked: those tensors in the blocked layout (see blocked_io).
    """
    outputs = [y] + ([macs_output] if macs_output else [])
    node = OPS[OP].node({"X": x, "W": w_name, "B": b_name, "other": other}, outputs, name=name,
                            **conv_attributes(kernel_shape=kernel_shape, strides=strides, pads=pads,
                                              dilations=dilations, group=group, auto_pad=auto_pad),
                            **layout_attributes(x_blocked, other_blocked, y_blocked),
                            **({} if relu else {"relu": 0}))
    return node, {}


# --- Blocked tensors between onnxzero ops (attributes x_blocked / other_blocked / y_blocked).

LAYOUT_ATTRIBUTES = ("x_blocked", "other_blocked", "y_blocked")


def blocked_io(w_shape: Sequence[int], group: int = 1) -> tuple[bool, bool, bool]:
    """Which tensors of a ConvRelu / LazyConv node may be blocked: (X, other, Y).

    The same rule as the kernels' nchwc::BlockedIoFor (runtime_ops/src/nchwc.cc), which refuses the
    attributes at session creation otherwise: group 1 and K % 16 == 0 for any of them, and C % 16 == 0
    for X; `other` and Y (K channels) also when C < 8 (a stem conv reads NCHW). Then every blocked
    tensor is a whole number of blocks on any CPU (B = 8 or 16), so the decision does not depend on
    the machine.
    """
    K, C = int(w_shape[0]), int(w_shape[1]) * int(group)
    if group != 1 or K <= 0 or C <= 0 or K % 16:
        return False, False, False
    x = C % 16 == 0
    return x, x or C < 8, x or C < 8


_BLOCK: list[int] = []


def block_size() -> int:
    """This CPU's block B of blocked tensors (8 or 16), as the library reports it: the last dimension
    of a y_blocked ConvRelu's output."""
    if not _BLOCK:
        from onnxzero.ops.session import make_session, single_op_model

        node, _ = make_node("X", "W", None, "Y", y_blocked=True)
        model = single_op_model(node, {"W": np.zeros((16, 1, 1, 1), np.float32)}, (1, 1, 1, 1))
        y = make_session(model).run(None, {"X": np.zeros((1, 1, 1, 1), np.float32)})[0]
        _BLOCK.append(int(y.shape[-1]))
    return _BLOCK[0]


def to_blocked(x: np.ndarray, block: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C/B, H, W, B), C % B == 0."""
    N, C, H, W = x.shape
    return np.ascontiguousarray(x.reshape(N, C // block, block, H, W).transpose(0, 1, 3, 4, 2))


def from_blocked(x: np.ndarray) -> np.ndarray:
    """(N, C/B, H, W, B) -> (N, C, H, W)."""
    N, Cb, H, W, B = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(N, Cb * B, H, W))


def layout_attributes(x_blocked: bool = False, other_blocked: bool = False, y_blocked: bool = False) -> dict:
    """The layout attributes that are set (0 = default, left out)."""
    return {k: 1 for k, v in zip(LAYOUT_ATTRIBUTES, (x_blocked, other_blocked, y_blocked)) if v}


def onnx_conv_relu_model(w: np.ndarray, b: np.ndarray | None, x_shape, *, opset: int = 17,
                         residual: bool = False, **conv_attrs) -> onnx.ModelProto:
    """Standard ONNX Conv(+B) -> Relu on the same weights: what onnxruntime itself runs (tests, bench).

    residual: Conv(+B) -> Add(conv, O) -> Relu with a second graph input "O" (a residual site).
    """
    from onnx import TensorProto, numpy_helper

    attrs = conv_attributes(**conv_attrs)
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), "W")]
    inputs = ["X", "W"]
    if b is not None:
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), "B"))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["C"], **attrs)]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", *x_shape[1:]])]
    if residual:
        nodes.append(helper.make_node("Add", ["C", "O"], ["S"]))
        graph_inputs.append(helper.make_tensor_value_info("O", TensorProto.FLOAT, None))
    nodes.append(helper.make_node("Relu", ["S" if residual else "C"], ["Y"]))
    graph = helper.make_graph(nodes, "conv_relu", graph_inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
