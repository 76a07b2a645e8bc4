"""Static cost of each node: parameters and true multiply-accumulates (MACs).

MACs are per sample (batch 1) and count only the multiply-accumulates of the
layers that carry weights:

* ``Conv``: ``out_H * out_W * K_h * K_w * (C_in / group) * C_out``, i.e. the
  output's spatial size times the weight tensor's element count (any rank);
* ``ConvTranspose``: the input's spatial size times the weight's element count;
* ``Gemm`` / ``MatMul``: ``in * out`` per sample (``K * N``; for batched
  MatMul, every output element costs ``K``).

Everything else costs 0 MACs on purpose: BatchNormalization, pooling, Add/Sum,
Relu, LRN, Softmax... do a few operations per element and carry no
multiply-accumulate weights; counting them would blur the "where are the
multiplications" picture the paper's Equations (1) and (2) give.

A node's parameters are the element count of its constant inputs
(initializers, including the weights folded from constant subgraphs), except
scalars (Clip bounds and the like) and int32/int64 constants (shapes, axes,
indices): those are not weights. A weight shared by several nodes counts once
in the model total.
"""

from __future__ import annotations

import math

import onnx

from onnxzero.profile.prepare import Prepared, Shape, is_param_tensor


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def node_params(node: onnx.NodeProto, prep: Prepared) -> int:
    total = 0
    for name in dict.fromkeys(x for x in node.input if x):  # an input used twice counts once
        c = prep.constants.get(name)
        if c is not None and is_param_tensor(*c):
            total += math.prod(c[0])
    return total


def model_params(prep: Prepared) -> int:
    used = {x for n in prep.model.graph.node for x in n.input if x}
    return sum(math.prod(dims) for name, (dims, dtype) in prep.constants.items()
               if name in used and is_param_tensor(dims, dtype))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shapes: dict[str, Shape], batch: int) -> int | None:
    """Per-sample MACs of one node; None when a shape it needs is unknown."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0

    def shape(i: int, out: bool = False) -> Shape | None:
        names = node.output if out else node.input
        if i >= len(names) or not names[i]:
            return None
        s = shapes.get(names[i])
        return s if _known(s) else None

    y = shape(0, out=True)
    if op == "Conv":
        w = shape(1)
        if y is None or w is None or len(y) < 2:
            return None
        total = y[0] * math.prod(y[2:]) * math.prod(w)
    elif op == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None or len(x) < 2:
            return None
        total = x[0] * math.prod(x[2:]) * math.prod(w)
    elif op == "Gemm":
        b = shape(1)
        if y is None or b is None or len(b) != 2:
            return None
        k = b[1] if _attr(node, "transB", 0) else b[0]
        total = math.prod(y) * k
    else:  # MatMul
        a = shape(0)
        if y is None or a is None or not a:
            return None
        total = math.prod(y) * a[-1]
    return total // batch if total % batch == 0 else round(total / batch)
