"""Blocked layout inside chains of onnxzero ops (issue 10 item 3: no reorder penalty between them).

ConvRelu and LazyConv run on MLAS's NCHWc kernels, which read and write activations in a blocked
layout (N, C/B, H, W, B). By default every op reorders its input to that layout and its output back
to NCHW; between two onnxzero ops that is two passes over the tensor for nothing. This pass marks
such tensors blocked: the producer writes Y blocked (attribute y_blocked=1) and each consumer reads
it blocked (x_blocked=1 as input 0, other_blocked=1 as the residual `other`, the last input). The
tensor stays NCHW at a chain's edges: wherever anything else reads it or it leaves the graph.

Like passes/fold_conv.py, a check returns the reason a tensor is left alone (None: it is blocked),
then the rewrite sets the attributes. Which node may take which blocked tensor is the kernels' rule,
onnxzero.ops.conv_relu.blocked_io (mirrored in C++ by nchwc::BlockedIoFor).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

from onnxzero import DOMAIN
from onnxzero.ops.conv_relu import blocked_io

PASS = "chain_layout"
# Ops that understand the layout attributes -> index of their residual input `other`.
OTHER_INPUT = {"ConvRelu": 3, "LazyConv": 6}


def _ours(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type in OTHER_INPUT


def node_io(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> tuple[bool, bool, bool]:
    """(X, other, Y): which of the node's tensors may be blocked (all False for other nodes)."""
    if not _ours(node) or len(node.input) < 2 or node.input[1] not in initializers:
        return False, False, False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return blocked_io(tuple(initializers[node.input[1]].dims), group)


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside the subgraphs (If / Loop / Scan bodies) of the graph's nodes."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                for n in sub.node:
                    names.update(n.input)
                names |= _subgraph_reads(sub)
    return names


def explain(model: onnx.ModelProto, producers: Iterable[str] = tuple(OTHER_INPUT)) -> dict[str, str | None]:
    """For each output 0 of an onnxzero op: None if it can be blocked, else why not.

    producers: the op types whose outputs may be blocked (all by default). A LazyConv that skips
    filters writes a blocked Y in a gather pass that costs about what the NCHW write-back plus the
    next op's reorder cost (docs/design-kernels.md section 6), so a caller may leave it out."""
    producers = set(producers)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    sub_reads = _subgraph_reads(g)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    verdicts: dict[str, str | None] = {}
    for node in g.node:
        if not _ours(node) or not node.output or not node.output[0]:
            continue
        y = node.output[0]
        if node.op_type not in producers:
            verdicts[y] = f"{node.name or node.op_type}: {node.op_type} outputs are not blocked (producers)"
            continue
        verdicts[y] = _check(node, y, inits, outputs, sub_reads, consumers.get(y, []))
    return verdicts


def _check(producer, y, inits, outputs, sub_reads, uses) -> str | None:
    if not node_io(producer, inits)[2]:
        return f"{producer.name or producer.op_type}: its weights cannot write a blocked output"
    if y in outputs:
        return f"'{y}' is a graph output"
    if y in sub_reads:
        return f"'{y}' is read inside a subgraph"
    if not uses:
        return f"'{y}' has no consumers"
    for node, i in uses:
        who = node.name or node.op_type
        if not _ours(node):
            return f"'{y}' is also read by {who} ({node.op_type})"
        x_ok, other_ok, _ = node_io(node, inits)
        if i == 0 and not x_ok:
            return f"{who} cannot read a blocked X"
        if i == OTHER_INPUT[node.op_type] and not other_ok:
            return f"{who} cannot read a blocked 'other'"
        if i not in (0, OTHER_INPUT[node.op_type]):
            return f"{who} reads '{y}' as input {i}"
    return None


def _set(node: onnx.NodeProto, name: str) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = 1
            return
    node.attribute.append(helper.make_attribute(name, 1))


def block_chains(model: onnx.ModelProto, producers: Iterable[str] = tuple(OTHER_INPUT)) -> onnx.ModelProto:
    """A copy of the model where every tensor passed only between onnxzero ops is blocked
    (only those written by `producers`, see explain)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    blocked = {y for y, why in explain(out, producers).items() if why is None}
    if not blocked:
        return out
    for node in g.node:
        if not _ours(node):
            continue
        if node.output[0] in blocked:
            _set(node, "y_blocked")
        if node.input[0] in blocked:
            _set(node, "x_blocked")
        k = OTHER_INPUT[node.op_type]
        if len(node.input) > k and node.input[k] in blocked:
            _set(node, "other_blocked")
    # Their recorded shapes would be 4-D; the tensors are now 5-D (B depends on the CPU).
    keep = [v for v in g.value_info if v.name not in blocked]
    del g.value_info[:]
    g.value_info.extend(keep)
    return out


__all__ = ["PASS", "block_chains", "explain", "node_io"]
