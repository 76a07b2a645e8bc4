"""Node names: the one scheme every step uses, so a site's name is the same everywhere.

normalize, the site finder and profile all name an unnamed node after its op type ('Conv',
'Conv_1', ... in graph order, onnx_ir's NameFixPass making names unique) and a repeated name
`name_1`, ...; so the site names `onnxzero profile` prints are the keys `rewrite --config` takes.
This module imports only onnx_ir, so profile need not import the optimizer normalize uses.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common


class OpTypeNames(common.naming.SimpleNameGenerator):
    """Unnamed nodes are named after their op type ('Conv', 'Conv_1', ...).

    NameFixPass makes names unique in graph order, so the names are deterministic and a
    site's name tells what it is.
    """

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type


def name_nodes_ir(model: ir.Model) -> int:
    """Name the model's unnamed or repeated nodes in place; return how many names were given."""
    before = [n.name for n in model.graph]
    common.NameFixPass(OpTypeNames())(model)
    return sum(1 for old, n in zip(before, model.graph, strict=True) if old != n.name)


def name_nodes(model: onnx.ModelProto) -> set[str]:
    """name_nodes_ir on a ModelProto's main graph, in place; return the names given.

    Only node names change (NameFixPass's value renames are not copied back: a valid model's
    values are uniquely named already).
    """
    m = ir.serde.deserialize_model(model)  # shares the tensors: no weight is copied
    name_nodes_ir(m)
    given = set()
    for proto, node in zip(model.graph.node, m.graph, strict=True):
        if proto.name != node.name:
            proto.name = node.name
            given.add(node.name)
    return given


def require_named(model: ir.Model) -> None:
    """Site names are node names: raise unless every node has one and no two share one."""
    names = [n.name for n in model.graph]
    if not all(names) or len(set(names)) != len(names):
        bad = next((f"node {i} ({n.op_type}) has no name" for i, n in enumerate(model.graph) if not n.name),
                   "two nodes share a name")
        raise RuntimeError(f"{bad}; expected every node named (normalize's NameNodesPass)")
