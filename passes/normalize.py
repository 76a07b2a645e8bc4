"""Normalize: bring any exported CNN to one shape the site finder and the rewrites can rely on.

After normalize a model has: a default-domain opset >= `opset`; every weight a plain
initializer (external data loaded, constant subgraphs such as ConstantOfShape folded);
BatchNormalization, per-channel Mul/Add and zero Pad folded into the Conv they touch;
every node named; shapes inferred. Graph input and output names and a dynamic batch
dimension are kept, and the model computes the same outputs.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnxscript import optimizer

from onnxzero.errors import UserError
from onnxzero.passes.fold_conv import FoldIntoConvPass
from onnxzero.passes.naming import OpTypeNames  # noqa: F401 - re-exported: the name scheme sites.py shares

PASS = "normalize"
MIN_OPSET = 7  # the oldest opset onnx.version_converter converts from reliably

# Folding limits, in elements. onnxscript's defaults (8192 in, 262144 out) keep big
# tensors out of the folder to keep models small; here the big tensors are the weights
# themselves (VGG19's fc6 is 103M elements), so the limits only guard against a
# constant subgraph exploding into something larger than any real weight.
FOLD_SIZE_LIMIT = 1 << 28

# Ops whose folded result is always worth storing. onnxscript never folds ConstantOfShape
# by default (it would grow the file); the light models compute every weight with one.
_ALWAYS_FOLD = frozenset({"ConstantOfShape"})

# Ops folded into a Conv by FoldIntoConvPass, for the report.
_FOLDABLE = ("BatchNormalization", "Mul", "Add", "Pad")


@dataclass(frozen=True)
class NormalizeReport:
    """What normalize changed. `modified` ignores shape annotations (value_info)."""

    opset_from: int
    opset_to: int
    external_data_loaded: bool = False
    initializer_inputs_removed: int = 0
    constants_folded: bool = False
    nodes_named: int = 0
    folded_into_conv: dict[str, int] = field(default_factory=dict)  # op type -> nodes folded

    @property
    def modified(self) -> bool:
        return bool(self.opset_to != self.opset_from or self.initializer_inputs_removed
                    or self.constants_folded or self.nodes_named or any(self.folded_into_conv.values()))


def normalize(model: onnx.ModelProto, *, opset: int = 17,
              base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, bool]:
    """Return (normalized model, modified). The input model is not changed.

    base_dir: where the model's external data files are, when `model` was loaded without
    them (onnxzero.load.load_model loads them; this is for a bare onnx.load(...,
    load_external_data=False)).
    """
    out, report = normalize_with_report(model, opset=opset, base_dir=base_dir)
    return out, report.modified


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    # No default-domain import: the graph uses no standard op, opset 1 by the spec.
    return 1


@contextlib.contextmanager
def _step(name: str):
    """Name the pass in any failure that is not already a UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise RuntimeError(f"{PASS}: {name} failed: {e}") from e


def normalize_with_report(model: onnx.ModelProto, *, opset: int = 17,
                          base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, NormalizeReport]:
    """normalize(), with a NormalizeReport of what it did instead of the bare flag."""
    model, ext_loaded = _load_external_data(model, base_dir)
    opset_from = default_opset(model)
    if opset_from < MIN_OPSET:
        raise UserError(f"{PASS}: the model uses ONNX opset {opset_from}; expected opset >= {MIN_OPSET} "
                        f"(older models cannot be converted: re-export the model)")
    opset_to = max(opset_from, opset)

    input_names = [v.name for v in model.graph.input]
    output_names = [v.name for v in model.graph.output]
    with _step("deserialize"):
        m = ir.serde.deserialize_model(model)  # tensors stay in `model`'s buffers, uncopied
    if opset_to != opset_from:
        m = _convert_opset(m, opset_to, opset_from)

    removed = 0
    if m.ir_version < 4:
        # Before IR 4 every initializer had to be listed as a graph input too, so there the
        # listing says nothing about the weight being fed at run time; from IR 4 on it does,
        # and such an initializer stays an (overridable) input.
        with _step("RemoveInitializersFromInputsPass"):
            listed = {v.name for v in m.graph.inputs}
            common.RemoveInitializersFromInputsPass()(m)
            dropped = listed - {v.name for v in m.graph.inputs}
            removed = len(dropped)
            input_names = [n for n in input_names if n not in dropped]
    # version_converter leaves ir_version alone; the opset needs at least this one.
    m.ir_version = max(m.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid(d, v) for d, v in m.opset_imports.items()], ignore_unknown=True))

    with _step("InlinePass"):
        # Convs inside model-local functions (some exporters emit them) must be visible to
        # the folds and to the site finder.
        inlined = common.InlinePass()(m).modified
        common.RemoveUnusedFunctionsPass()(m)

    with _step("fold_constants"):
        folded = inlined | optimizer.fold_constants(
            m, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT,
            should_fold=lambda node: True if node.op_type in _ALWAYS_FOLD and node.domain == "" else None,
        ).modified
        # Weights held by Constant nodes become initializers: the fold rules and the site
        # finder read weights from initializers.
        folded |= common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m).modified
        folded |= common.RemoveUnusedNodesPass()(m).modified

    with _step("NameFixPass"):
        unnamed = sum(1 for n in m.graph if not n.name)
        common.NameFixPass(OpTypeNames())(m)

    with _step("ShapeInferencePass"):
        common.ShapeInferencePass()(m)

    with _step("FoldIntoConvPass"):
        before = collections.Counter(n.op_type for n in m.graph)
        FoldIntoConvPass()(m)
        common.RemoveUnusedNodesPass()(m)
        after = collections.Counter(n.op_type for n in m.graph)
        into_conv = {op: before[op] - after[op] for op in _FOLDABLE if before[op] != after[op]}

    with _step("ShapeInferencePass"):
        common.NameFixPass(OpTypeNames())(m)
        common.ShapeInferencePass()(m)

    if [v.name for v in m.graph.inputs] != input_names or [v.name for v in m.graph.outputs] != output_names:
        raise RuntimeError(f"{PASS}: graph input/output names changed: {input_names} -> "
                           f"{[v.name for v in m.graph.inputs]}, {output_names} -> {[v.name for v in m.graph.outputs]}")
    with _step("serialize"):
        out = ir.serde.serialize_model(m)
    return out, NormalizeReport(opset_from=opset_from, opset_to=opset_to, external_data_loaded=ext_loaded,
                                initializer_inputs_removed=removed, constants_folded=folded,
                                nodes_named=unnamed, folded_into_conv=into_conv)


# Initializers above this size skip the trip through onnx.version_converter.
_STUB_BYTES = 1024


def _convert_opset(m: ir.Model, target: int, source: int) -> ir.Model:
    """onnx.version_converter, with the large initializers stubbed out.

    The converter serializes the whole model to C++ and parses the result back, 16 s for
    VGG19's 0.5 GB of weights. No adapter reads a large weight, so the graph goes through
    with large initializers turned into typed graph inputs (the trick onnx_ir uses for
    onnx.shape_inference), and the tensors are put back by name afterwards.
    """
    graph = m.graph
    big = {name: v for name, v in graph.initializers.items()
           if v.const_value is not None and v.const_value.nbytes > _STUB_BYTES}
    listed = {v.name for v in graph.inputs}
    for name, v in big.items():
        v.shape = v.shape or v.const_value.shape
        v.dtype = v.dtype or v.const_value.dtype
        graph.initializers.pop(name)
        if name not in listed:
            graph.inputs.append(v)
    try:
        stub = ir.serde.serialize_model(m)
    finally:
        for name, v in big.items():
            if name not in listed:
                graph.inputs.remove(v)
            graph.register_initializer(v)
    try:
        converted = onnx.version_converter.convert_version(stub, target)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{PASS}: onnx.version_converter cannot convert the model from opset "
                        f"{source} to {target}: {first}") from None
    with _step("restore initializers after version conversion"):
        out = ir.serde.deserialize_model(converted)
        g = out.graph
        for v in list(g.inputs):
            if v.name in big:
                v.const_value = big[v.name].const_value
                if v.name not in listed:
                    g.inputs.remove(v)
                g.register_initializer(v)
    return out


def _external_tensors(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if uses_external_data(t)]


def _load_external_data(model: onnx.ModelProto, base_dir: str | Path | None) -> tuple[onnx.ModelProto, bool]:
    pending = _external_tensors(model)
    if not pending:
        return model, False
    if base_dir is None:
        raise UserError(f"{PASS}: initializer '{pending[0]}' keeps its data in an external file that was not "
                        f"loaded; expected the model loaded with onnxzero.load.load_model(path), or base_dir given")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        load_external_data_for_model(copy, str(base_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{PASS}: cannot load external data from {base_dir}: {e}") from None
    return copy, True
