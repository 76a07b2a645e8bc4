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
from onnxzero.passes.naming import OpTypeNames, name_nodes_ir, require_named  # noqa: F401 - OpTypeNames re-exported

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
    m, report = normalize_ir(model, opset=opset, base_dir=base_dir)
    with _step("serialize"):
        return ir.serde.serialize_model(m), report


def normalize_ir(model: onnx.ModelProto, *, opset: int = 17,
                 base_dir: str | Path | None = None) -> tuple[ir.Model, NormalizeReport]:
    """normalize_with_report(), returning the in-memory IR model the later passes (find_sites) read.

    The IR model shares `model`'s weight buffers (nothing is copied); `model` itself is not changed.
    """
    model, ext_loaded = _load_external_data(model, base_dir)
    opset_from = default_opset(model)
    if opset_from < MIN_OPSET:
        raise UserError(f"{PASS}: the model uses ONNX opset {opset_from}; expected opset >= {MIN_OPSET} "
                        f"(older models cannot be converted: re-export the model)")
    opset_to = max(opset_from, opset)

    with _step("deserialize"):
        m = ir.serde.deserialize_model(model)  # tensors stay in `model`'s buffers, uncopied
    if opset_to != opset_from:
        m = _convert_opset(m, opset_to, opset_from)

    interface = KeepInterface(m)
    legacy, fold, name = LegacyInputsPass(), FoldConstantsPass(), NameNodesPass()
    # Convs inside model-local functions (some exporters emit them) must be visible to the folds
    # and to the site finder.
    inline = Step(common.InlinePass())
    into_conv = CountFolds(FoldIntoConvPass(), _FOLDABLE)
    run_passes([legacy, inline, Step(common.RemoveUnusedFunctionsPass()), fold, name, Step(common.ShapeInferencePass()),
                into_conv, NameNodesPass(), Step(common.ShapeInferencePass()), interface], m)
    return m, NormalizeReport(opset_from=opset_from, opset_to=opset_to, external_data_loaded=ext_loaded,
                              initializer_inputs_removed=len(legacy.dropped),
                              constants_folded=inline.modified or fold.folded,
                              nodes_named=name.unnamed, folded_into_conv=into_conv.folded)


# --- the passes normalize runs (onnx_ir passes: requires / call / ensures) -----------------------


def run_passes(passes: list[ir.passes.PassBase], m: ir.Model) -> ir.passes.PassResult:
    """Run `passes` in an onnx_ir PassManager on `m`.

    The manager wraps a failure in PassErrors; the caller gets the failure itself: a UserError as
    it is, anything else as the pass's own one-line RuntimeError naming it (see _step)."""
    try:
        return ir.passes.PassManager(passes)(m)
    except ir.passes.PassError as e:
        cause: BaseException = e
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise cause from (None if isinstance(cause, UserError) else cause.__cause__)


class _Step(ir.passes.InPlacePass):
    """An in-place pass whose failures name it: normalize: <Pass> failed: ... (a UserError as it is)."""

    def __call__(self, model_or_result):
        with _step(type(self).__name__):
            return super().__call__(model_or_result)


class Step(_Step):
    """onnx_ir's own in-place pass `inner`, its failures named; `modified` says whether it changed anything."""

    def __init__(self, inner: ir.passes.PassBase):
        super().__init__()
        self.inner, self.modified = inner, False

    def __call__(self, model_or_result):
        with _step(type(self.inner).__name__):
            return ir.passes.InPlacePass.__call__(self, model_or_result)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        self.modified = result.modified
        return ir.passes.PassResult(model, result.modified)


class LegacyInputsPass(_Step):
    """IR < 4 lists every initializer as a graph input too, so there the listing says nothing about
    the weight being fed at run time: drop it (from IR 4 on it does, and such an initializer stays
    an overridable input). Then raise ir_version to what the opsets need (version_converter leaves
    it alone)."""

    def __init__(self):
        super().__init__()
        self.dropped: set[str] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if model.ir_version < 4:
            listed = {v.name for v in model.graph.inputs}
            modified = common.RemoveInitializersFromInputsPass()(model).modified
            self.dropped = listed - {v.name for v in model.graph.inputs}
        need = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()], ignore_unknown=True)
        if model.ir_version < need:
            model.ir_version, modified = need, True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        if model.ir_version < 4 and any(v.const_value is not None for v in model.graph.inputs):
            raise RuntimeError(f"{PASS}: an IR {model.ir_version} graph input still lists an initializer")


class FoldConstantsPass(_Step):
    """onnxscript's constant folder with limits that let weights through, ConstantOfShape always
    folded; then every Constant node's tensor becomes an initializer (the folds into Conv and the
    site finder read weights from initializers) and unused nodes go."""

    folded = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = optimizer.fold_constants(
            model, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT,
            should_fold=lambda node: True if node.op_type in _ALWAYS_FOLD and node.domain == "" else None,
        ).modified
        folded |= common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        folded |= common.RemoveUnusedNodesPass()(model).modified
        self.folded = folded
        return ir.passes.PassResult(model, folded)


class NameNodesPass(_Step):
    """Every node named as onnxzero.passes.naming says (the scheme profile and find_sites share)."""

    unnamed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.unnamed = sum(1 for n in model.graph if not n.name)
        return ir.passes.PassResult(model, name_nodes_ir(model) > 0)

    def ensures(self, model: ir.Model) -> None:
        require_named(model)


class CountFolds(_Step):
    """Runs a folding pass and counts, per op type in `ops`, the nodes that went."""

    def __init__(self, inner: ir.passes.PassBase, ops: tuple[str, ...]):
        super().__init__()
        self.inner, self.ops = inner, ops
        self.folded: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = collections.Counter(n.op_type for n in model.graph)
        result = self.inner(model)
        common.RemoveUnusedNodesPass()(model)
        after = collections.Counter(n.op_type for n in model.graph)
        self.folded = {op: before[op] - after[op] for op in self.ops if before[op] != after[op]}
        return ir.passes.PassResult(model, result.modified)


class KeepInterface(_Step):
    """Changes nothing; ensures the graph's input and output names are those it was made with
    (less the IR < 4 initializer listings)."""

    def __init__(self, model: ir.Model):
        super().__init__()
        self.inputs = [v.name for v in model.graph.inputs if not (model.ir_version < 4 and v.const_value is not None)]
        self.outputs = [v.name for v in model.graph.outputs]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)

    def ensures(self, model: ir.Model) -> None:
        ins, outs = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
        if ins != self.inputs or outs != self.outputs:
            raise RuntimeError(f"{PASS}: graph input/output names changed: {self.inputs} -> {ins}, "
                               f"{self.outputs} -> {outs}")


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
