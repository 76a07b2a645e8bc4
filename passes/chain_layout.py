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

import numpy as np
import onnx
from onnx import helper

from onnxzero import DOMAIN
from onnxzero.ops.spec import OPS
from onnxzero.ops.conv_relu import LAYOUT_ATTRIBUTES, blocked_io

PASS = "chain_layout"
# Ops that understand the layout attributes (the spec declares x_blocked) -> index of their residual
# input `other`.
OTHER_INPUT = {name: op.index("other") for name, op in OPS.items() if "x_blocked" in op.attributes}


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


# --- Whole chains: the onnxruntime Convs next to onnxzero ops become ConvRelu too.

def _conv_attrs(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
    return [a for a in node.attribute if a.name in ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")]


def _convertible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """Why an onnxruntime Conv cannot become a ConvRelu that passes blocked tensors (None: it can)."""
    who = node.name or "Conv"
    if len(node.input) < 2 or node.input[1] not in inits:
        return f"{who}: weights are not a constant initializer"
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return f"{who}: bias is not a constant initializer"
    w = tuple(inits[node.input[1]].dims)
    if len(w) != 4 or inits[node.input[1]].data_type != onnx.TensorProto.FLOAT:
        return f"{who}: not a 2-D float Conv"
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if not any(blocked_io(w, group)):
        return f"{who}: weights {w}, group {group} take no blocked tensor"
    return None


def _absorb(g: onnx.GraphProto, conv: onnx.NodeProto, consumers, producer_of, outputs, inits):
    """The nodes after `conv` that a ConvRelu can take over: (Relu,) or (Add, Relu) whose
    intermediate tensors nobody else reads, with the Add's other operand shaped like the conv output
    as far as the graph says (else ()). Returns (absorbed nodes, other operand or None, relu)."""
    def sole(t):
        uses = consumers.get(t, [])
        return uses[0][0] if len(uses) == 1 and t not in outputs else None

    nxt = sole(conv.output[0])
    if nxt is None or nxt.domain not in ("", "ai.onnx"):
        return (), None, False
    if nxt.op_type == "Relu":
        return (nxt,), None, True
    if nxt.op_type == "Add" and len(nxt.input) == 2:
        other = nxt.input[1] if nxt.input[0] == conv.output[0] else nxt.input[0]
        # The same tensor on both sides, a constant (broadcast bias) or a smaller tensor: not a residual.
        if other == conv.output[0] or other in inits or other not in producer_of:
            return (), None, False
        prod = producer_of[other]
        if not (_ours(prod) or (prod.op_type in ("Conv", "Relu", "Add"))):
            return (), None, False
        relu = sole(nxt.output[0])
        if relu is not None and relu.op_type == "Relu" and relu.domain in ("", "ai.onnx"):
            return (nxt, relu), other, True
        return (nxt,), other, False
    return (), None, False


def _to_conv_relu(conv, absorbed, other, relu) -> onnx.NodeProto:
    inputs = list(conv.input[:3])
    if other:
        inputs = [inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else "", other]
    y = absorbed[-1].output[0] if absorbed else conv.output[0]
    node = helper.make_node("ConvRelu", inputs, [y], name=(conv.name or "Conv") + "__chain", domain=DOMAIN)
    node.attribute.extend(_conv_attrs(conv))
    if not relu:
        node.attribute.append(helper.make_attribute("relu", 0))
    return node


def _convert(model: onnx.ModelProto, pick) -> tuple[onnx.ModelProto, list, dict[str, str]]:
    """A copy of the model where each onnxruntime Conv that pick(conv, y, other, relu, ours_out, ours_in)
    accepts is a ConvRelu (taking over its Relu / Add(+Relu), see _absorb). Returns (model, plans, kept):
    plans [(conv, absorbed nodes, new node)], kept {Conv name: why it stays} for picked but refused Convs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    sub_reads = _subgraph_reads(g)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producer_of: dict[str, onnx.NodeProto] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
        for name in node.output:
            producer_of[name] = node
    ours_out = {t for n in g.node if _ours(n) for t in n.output[:1]}
    ours_in = {t for n in g.node if _ours(n) for t in n.input if t}
    kept: dict[str, str] = {}
    plans: list[tuple[onnx.NodeProto, tuple, onnx.NodeProto]] = []
    convs = [n for n in g.node if n.domain in ("", "ai.onnx") and n.op_type == "Conv"]
    found = {id(n): _absorb(g, n, consumers, producer_of, outputs, inits) for n in convs}
    # An Add fed by two Convs (main path and projection) goes to the one with more weights (more MACs
    # on the same output), as in passes/sites.py; the other becomes a plain conv feeding it as `other`.
    owner: dict[int, onnx.NodeProto] = {}
    size = {id(n): int(np.prod(inits[n.input[1]].dims)) if n.input[1] in inits else 0 for n in convs}
    for n in convs:
        if found[id(n)][0]:
            add = id(found[id(n)][0][0])
            if add not in owner or size[id(n)] > size[id(owner[add])]:
                owner[add] = n
    for n in convs:
        if found[id(n)][0] and owner[id(found[id(n)][0][0])] is not n:
            found[id(n)] = ((), None, False)
    for node in convs:
        absorbed, other, relu = found[id(node)]
        y = absorbed[-1].output[0] if absorbed else node.output[0]
        if not pick(node, y, other, relu, ours_out, ours_in):
            continue
        why = _convertible(node, inits)
        if why is None and (node.output[0] in sub_reads or any(a.output[0] in sub_reads for a in absorbed)):
            why = f"{node.name or 'Conv'}: its output is read inside a subgraph"
        if why is not None:
            kept[node.name or node.output[0]] = why
            continue
        plans.append((node, absorbed, _to_conv_relu(node, absorbed, other, relu)))
    if plans:
        # The new node takes the place of the last node it replaces: an Add's other operand (a
        # projection computed after the main path) is then still read after it is written.
        replace = {id(absorbed[-1] if absorbed else c): new for c, absorbed, new in plans}
        drop = {id(n) for c, absorbed, _ in plans for n in (c, *absorbed)} - set(replace)
        nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in out.opset_import):
            from onnxzero import OP_VERSION
            out.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return out, plans, kept


def conv_relu_sites(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv(+bias) -> [Add(other) ->] Relu of the model as one dense ConvRelu (no blocked tensors):
    the "every site ConvRelu" baseline of benchmarks/bench_fixed.py."""
    return _convert(model, lambda conv, y, other, relu, oo, oi: relu)[0]


def apply_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Whole chains of onnxzero ops with blocked tensors between them (issue 10 item 3).

    Every onnxruntime Conv that reads an onnxzero op's output, or whose output (or Add operand) an
    onnxzero op reads (projection shortcuts, sites the search left alone), becomes a ConvRelu, taking
    over a following Relu or Add(residual)(+Relu) where nothing else reads the tensors in between
    (attribute relu=0 when no Relu follows); then block_chains marks every tensor passed only between
    onnxzero ops blocked. A converted Conv that ends up with no blocked tensor is put back as it was:
    it would only trade onnxruntime's fused NCHWc Conv for ours. Returns (a copy of the model, report):
    report["converted"]: names of the Convs replaced (the new node is named <name>__chain);
    report["kept"]: {Conv name: why it stays onnxruntime's} for Convs next to onnxzero ops;
    report["blocked"]: the blocked tensors; report["edges"]: {tensor: why it stays NCHW} for the other
    outputs of onnxzero ops (graph outputs, tensors also read by onnxruntime nodes).
    The converted convs compute what onnxruntime's Conv(+Add)(+Relu) computes up to float rounding
    (the same MLAS kernels, another summation order where onnxruntime fuses the Add).
    """
    def adjacent(conv, y, other, relu, ours_out, ours_in):
        return conv.input[0] in ours_out or y in ours_in or other in ours_out

    out, plans, kept = _convert(model, adjacent)
    blocked_out = block_chains(out)
    back = {}
    for conv, absorbed, new in plans:
        now = next(n for n in blocked_out.graph.node if n.name == new.name)
        if not any(a.name in LAYOUT_ATTRIBUTES and a.i for a in now.attribute):
            back[new.name] = (conv, absorbed)
            kept[conv.name or conv.output[0]] = f"{conv.name or 'Conv'}: would pass no blocked tensor"
    if back:  # put back in the new node's place (its inputs are all written before it)
        nodes = []
        for n in blocked_out.graph.node:
            if n.name in back:
                conv, absorbed = back[n.name]
                nodes.append(conv)
                nodes.extend(absorbed)
            else:
                nodes.append(n)
        del blocked_out.graph.node[:]
        blocked_out.graph.node.extend(nodes)
    verdicts = explain(blocked_out)
    report = {
        "converted": [c.name or c.output[0] for c, _, new in plans if new.name not in back],
        "kept": kept,
        "blocked": sorted(t for t, why in verdicts.items() if why is None),
        "edges": {t: why for t, why in verdicts.items() if why is not None},
    }
    return blocked_out, report


__all__ = ["PASS", "apply_chains", "block_chains", "conv_relu_sites", "explain", "node_io"]
