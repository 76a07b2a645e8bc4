"""Find the Conv+ReLU sites a rewrite can replace, and say why every other Conv is not one.

A site is a 2-D float32 Conv with constant weights (and constant bias, if any) whose
output goes only to a Relu, or only to a Clip with min 0 (ReLU6 and friends: the rewrite
keeps a Clip(0, clip_max) after the op). A residual site is the same Conv whose output goes
only to an Add with a tensor of the same shape (`other`: an identity shortcut or a projection
conv's output, either operand order), whose sum goes only to that Relu or Clip: the op then
takes `other` as one more input. When both operands of the Add come from Convs that could be
its site, the one with more MACs is (the main path, not a 1x1 projection shortcut). Every Conv
of the main graph gets a ConvVerdict: the Site it became or a one-line reason, which
`onnxzero rewrite MODEL --explain` prints.

Run it on a normalized model (onnxzero.passes.normalize): then BatchNormalization and
per-channel Mul/Add are already folded into the Conv, so a Conv -> BN -> Relu counts.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxzero.errors import UserError
from onnxzero.passes.naming import name_nodes_ir, require_named
from onnxzero.ops.session import conv_geometry

PASS = "find_sites"

Dim = int | str  # a static size, a symbolic dimension's name, or "?" when unknown


class NotSite(enum.StrEnum):
    """Why a Conv is not a site (the machine-readable half of ConvVerdict.reason)."""

    NOT_2D = "not-2d"
    NOT_FLOAT = "not-float"
    DYNAMIC_WEIGHTS = "dynamic-weights"
    GRAPH_OUTPUT = "graph-output"
    NO_RELU = "no-relu"
    SHARED_OUTPUT = "shared-output"
    CLIP_MIN = "clip-min"
    CLIP_MAX = "clip-max"
    ADD_SHAPE = "add-shape"  # the Add broadcasts: its other operand is not of the conv output's shape
    ADD_PARTNER = "add-partner"  # the Add's other operand is a Conv that is its site


@dataclass(frozen=True)
class Site:
    """One Conv+ReLU (or Conv+Clip(0, max)) the rewrite may replace. Shapes are per sample."""

    name: str  # the Conv node's name: the site's stable id
    conv: str  # Conv node name (== name)
    activation: str  # the Relu or Clip node's name
    activation_op: str  # "Relu" or "Clip"
    clip_max: float | None  # Clip's upper bound to keep after the op; None for Relu or no max
    x: str  # Conv data input
    w: str  # weight initializer
    b: str | None  # bias initializer, None when the Conv has none
    conv_output: str  # Conv output: disappears in the rewrite
    y: str  # activation output: what the rest of the graph reads
    x_shape: tuple[Dim, Dim, Dim]  # (C, H, W)
    w_shape: tuple[int, int, int, int]  # (K, C/group, KH, KW)
    y_shape: tuple[Dim, Dim, Dim]  # (K, OH, OW)
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] | None  # top, left, bottom, right; None: SAME_* on a symbolic size
    auto_pad: str  # as the model has it; pads above already resolve it when they can
    dilations: tuple[int, int]
    group: int
    macs: int | None  # OH*OW*KH*KW*(C/group)*K per sample; None when H or W is symbolic
    input_nonneg: bool  # x is provably >= 0 (early-exit exact mode needs it)
    nonneg_reason: str  # the chain that proves it, or what breaks it
    # Residual site: Conv -> Add(conv, residual) -> Relu. The op takes `residual` as one more input
    # and outputs ReLU(conv + bias + residual); the Add node disappears in the rewrite too.
    residual: str | None = None  # the Add's other operand (same shape as the conv output)
    add: str | None = None  # the Add node's name

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return self.w_shape[2], self.w_shape[3]


@dataclass(frozen=True)
class ConvVerdict:
    """A Conv node and either the Site it became or why it is not one."""

    conv: str
    site: Site | None
    code: NotSite | None = None
    reason: str | None = None  # one line, None for a site

    @property
    def is_site(self) -> bool:
        return self.site is not None

    def line(self) -> str:
        """One line for `onnxzero rewrite --explain`."""
        if self.site is None:
            return f"{self.conv}: not a site: {self.reason}"
        s = self.site
        act = "Relu" if s.activation_op == "Relu" else f"Clip(0, {s.clip_max:g})" if s.clip_max is not None else "Clip(0, inf)"
        dims = lambda t: "x".join(str(d) for d in t)  # noqa: E731
        macs = f"{s.macs / 1e6:.3g}M MACs" if s.macs is not None else "MACs unknown (symbolic H/W)"
        sign = "non-negative" if s.input_nonneg else "may be negative"
        kind = f"residual site -> add '{s.add}' (+ '{s.residual}') -> " if s.residual else "site -> "
        return (f"{s.conv}: {kind}{act} '{s.activation}'; x {dims(s.x_shape)} -> y {dims(s.y_shape)}, "
                f"k {dims(s.kernel_shape)} s {dims(s.strides)} p {s.pads} d {dims(s.dilations)} g {s.group}; "
                f"{macs}; input {sign} ({s.nonneg_reason})")


class FindSitesPass(ir.passes.InPlacePass):
    """explain() as an onnx_ir analysis pass: it changes nothing and leaves the verdicts in
    `self.verdicts` (`self.sites`: the sites). Requires a named model (normalize's NameNodesPass),
    because a site's name is its Conv's name."""

    def __init__(self, *, nonneg_inputs: Collection[str] = ()):
        super().__init__()
        self.nonneg_inputs = tuple(nonneg_inputs)
        self.verdicts: list[ConvVerdict] = []

    @property
    def sites(self) -> list[Site]:
        return [v.site for v in self.verdicts if v.site is not None]

    def requires(self, model: ir.Model) -> None:
        require_named(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.verdicts = explain(model, nonneg_inputs=self.nonneg_inputs)
        return ir.passes.PassResult(model, False)


def find_sites(model: onnx.ModelProto | ir.Model, *, nonneg_inputs: Collection[str] = ()) -> list[Site]:
    """The sites of `model`, in graph order. See explain() for the arguments."""
    return [v.site for v in explain(model, nonneg_inputs=nonneg_inputs) if v.site is not None]


def explain(model: onnx.ModelProto | ir.Model, *, nonneg_inputs: Collection[str] = ()) -> list[ConvVerdict]:
    """A ConvVerdict for every Conv of the main graph, in graph order.

    model: a ModelProto (left unchanged; shapes are inferred on a copy and unnamed nodes
    are named as normalize names them) or an ir.Model (read as it is, not modified).
    nonneg_inputs: graph inputs known to be >= 0 (e.g. images scaled to [0, 1]).
    """
    m = _prepare(model)
    graph = m.graph
    unknown = set(nonneg_inputs) - {v.name for v in graph.inputs}
    if unknown:
        raise UserError(f"{PASS}: nonneg_inputs names {sorted(unknown)[0]!r}, which is not a graph input "
                        f"(inputs: {', '.join(v.name for v in graph.inputs)})")
    legacy_inputs = m.ir_version < 4
    nonneg = _NonNegative(graph, set(nonneg_inputs), legacy_inputs)
    verdicts = []
    for i, node in enumerate(graph):
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
            name = node.name or f"Conv#{i}"
            verdicts.append(_judge(node, name, legacy_inputs, nonneg))
    return _one_site_per_add(verdicts)


def _one_site_per_add(verdicts: list[ConvVerdict]) -> list[ConvVerdict]:
    """An Add fed by two candidate Convs gets one site: the Conv with more MACs (ties: graph order)."""
    by_add: dict[str, list[int]] = {}
    for i, v in enumerate(verdicts):
        if v.site is not None and v.site.add is not None:
            by_add.setdefault(v.site.add, []).append(i)
    out = list(verdicts)
    for add, idx in by_add.items():
        if len(idx) < 2:
            continue
        keep = max(idx, key=lambda i: (verdicts[i].site.macs or 0, -i))
        for i in idx:
            if i != keep:
                out[i] = ConvVerdict(verdicts[i].conv, None, NotSite.ADD_PARTNER,
                                     f"its residual add '{add}' already has a site: Conv '{verdicts[keep].conv}' "
                                     f"(more MACs); this Conv's output is that site's other input")
    return out


# --- judging one Conv ---------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, code: NotSite, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def _judge(conv: ir.Node, name: str, legacy_inputs: bool, nonneg: _NonNegative) -> ConvVerdict:
    try:
        return ConvVerdict(name, _site(conv, name, legacy_inputs, nonneg))
    except _Reject as r:
        return ConvVerdict(name, None, r.code, r.reason)


def _site(conv: ir.Node, name: str, legacy_inputs: bool, nonneg: _NonNegative) -> Site:
    x, w = conv.inputs[0], conv.inputs[1]
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    y = conv.outputs[0]

    wt = _constant(w, legacy_inputs)
    rank = len(wt.shape) if wt is not None else len(w.shape) if w.shape is not None else \
        len(x.shape) if x.shape is not None else None
    if rank != 4:
        what = "unknown rank" if rank is None else f"a {rank - 2}-D convolution (weight rank {rank})"
        raise _Reject(NotSite.NOT_2D, f"{what}; the kernels are 2-D")
    dtype = x.dtype or w.dtype
    if dtype != ir.DataType.FLOAT:
        raise _Reject(NotSite.NOT_FLOAT, f"input type is {dtype.name if dtype else 'unknown'}; the kernels take float32")
    if wt is None:
        raise _Reject(NotSite.DYNAMIC_WEIGHTS, f"dynamic weights: '{w.name}' is {_origin(w)}, not a constant")
    if b is not None and _constant(b, legacy_inputs) is None:
        raise _Reject(NotSite.DYNAMIC_WEIGHTS, f"dynamic bias: '{b.name}' is {_origin(b)}, not a constant")
    if y.is_graph_output():
        raise _Reject(NotSite.GRAPH_OUTPUT, f"its output '{y.name}' is a graph output, which the ReLU would change")

    uses = list(y.uses())
    users = ", ".join(f"{u.op_type} '{u.name}'" for u, _ in uses)
    if not uses:
        raise _Reject(NotSite.NO_RELU, "no ReLU after it (its output is unused)")
    if len(uses) > 1:
        if any(_is_relu_like(u) for u, _ in uses):
            raise _Reject(NotSite.SHARED_OUTPUT, f"its output is used by other nodes as well ({users}), "
                                                 "which need the values the ReLU drops")
        raise _Reject(NotSite.NO_RELU, f"no ReLU after it (its output goes to {users})")
    act = uses[0][0]
    add = residual = None
    if act.op_type in ("Add", "Sum") and act.domain in ("", "ai.onnx"):  # Sum of two is an Add
        add, (act, residual) = act, _through_add(act, y)
        uses = [(act, 0)]
    clip_max = None
    if act.op_type == "Clip" and act.domain in ("", "ai.onnx"):
        lo, hi = _clip_bounds(act, legacy_inputs)
        if lo is None:
            raise _Reject(NotSite.CLIP_MIN, f"Clip '{act.name}' after it has no lower bound, so it is no ReLU")
        if isinstance(lo, str):
            raise _Reject(NotSite.CLIP_MIN, f"Clip '{act.name}' after it has a non-constant min ({lo})")
        if lo != 0.0:
            raise _Reject(NotSite.CLIP_MIN, f"Clip '{act.name}' after it has min {lo:g}, not 0")
        if isinstance(hi, str):
            raise _Reject(NotSite.CLIP_MAX, f"Clip '{act.name}' after it has a non-constant max ({hi})")
        clip_max = hi
    elif not (act.op_type == "Relu" and act.domain in ("", "ai.onnx")):
        raise _Reject(NotSite.NO_RELU, f"no ReLU after it (its output goes to {users})")

    attrs = conv.attributes
    strides = tuple(attrs.get_ints("strides", (1, 1)))
    dilations = tuple(attrs.get_ints("dilations", (1, 1)))
    group = attrs.get_int("group", 1)
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    pads = tuple(attrs.get_ints("pads", (0, 0, 0, 0)))
    w_shape = tuple(int(d) for d in wt.shape)
    c_in = w_shape[1] * group
    xs = _dims(x.shape, 4)
    h, wd = xs[2], xs[3]
    macs = None
    ys = _dims(act.outputs[0].shape, 4) if act.outputs[0].shape is not None else _dims(y.shape, 4)
    if isinstance(h, int) and isinstance(wd, int):
        geo = conv_geometry((1, c_in, h, wd), w_shape, strides=strides, pads=pads, dilations=dilations,
                            group=group, auto_pad=auto_pad)
        pads, macs, out_hw = geo.pads, geo.macs, (geo.OH, geo.OW)
    else:
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = None
        elif auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        out_hw = (ys[2], ys[3])
    return Site(
        name=name, conv=name, activation=act.name, activation_op=act.op_type, clip_max=clip_max,
        x=x.name, w=w.name, b=b.name if b is not None else None, conv_output=y.name, y=act.outputs[0].name,
        residual=residual.name if residual is not None else None, add=add.name if add is not None else None,
        x_shape=(c_in, h, wd), w_shape=w_shape, y_shape=(w_shape[0], *out_hw),
        strides=strides, pads=pads, auto_pad=auto_pad, dilations=dilations, group=group, macs=macs,
        input_nonneg=nonneg.of(x)[0], nonneg_reason=nonneg.of(x)[1],
    )


def _through_add(add: ir.Node, y: ir.Value) -> tuple[ir.Node, ir.Value]:
    """(the activation after a residual Add, the Add's other operand), or _Reject with the reason."""
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        raise _Reject(NotSite.NO_RELU, f"no ReLU after it (its output goes to {add.op_type} '{add.name}', "
                                       "which does not add exactly one other tensor to it)")
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    # dims 1..3 must match exactly; the batch may be named differently by the exporter
    if y.shape is None or other.shape is None or len(y.shape) != 4 or len(other.shape) != 4 \
            or any(_dim(a) != _dim(b) or _dim(a) is None for a, b in zip(list(other.shape)[1:], list(y.shape)[1:])):
        raise _Reject(NotSite.ADD_SHAPE, f"its residual {add.op_type} '{add.name}' adds '{other.name}' of shape "
                                         f"{_shape_str(other.shape)}, expected the conv output's {_shape_str(y.shape)}")
    s = add.outputs[0]
    if s.is_graph_output():
        raise _Reject(NotSite.GRAPH_OUTPUT, f"the output '{s.name}' of its residual {add.op_type} '{add.name}' is a graph output, "
                                            "which the ReLU would change")
    uses = list(s.uses())
    users = ", ".join(f"{u.op_type} '{u.name}'" for u, _ in uses) or "nothing"
    if len(uses) != 1:
        code = NotSite.SHARED_OUTPUT if any(_is_relu_like(u) for u, _ in uses) else NotSite.NO_RELU
        raise _Reject(code, f"its residual {add.op_type} '{add.name}' output goes to {users}, expected a single ReLU")
    act = uses[0][0]
    if not (_is_relu_like(act) and act.domain in ("", "ai.onnx")):
        raise _Reject(NotSite.NO_RELU, f"no ReLU after it (its residual {add.op_type} '{add.name}' goes to {users})")
    return act, other


def _dim(d) -> int | str | None:
    return d if isinstance(d, int) else d.value


def _shape_str(shape: ir.Shape | None) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + ")"


def _dims(shape: ir.Shape | None, rank: int) -> tuple[Dim, ...]:
    if shape is None or len(shape) != rank:
        return ("?",) * rank
    return tuple(d if isinstance(d, int) else (d.value or "?") for d in shape)


def _is_relu_like(node: ir.Node) -> bool:
    return node.op_type in ("Relu", "Clip")


def _constant(value: ir.Value | None, legacy_inputs: bool) -> ir.TensorProtocol | None:
    """The value's tensor if it is a constant: an initializer that is not an (overridable)
    graph input, or a Constant node's output."""
    if value is None:
        return None
    if value.const_value is not None and value.is_graph_input() and not legacy_inputs:
        return None
    return ir.convenience.get_const_tensor(value)


def _origin(value: ir.Value) -> str:
    if value.is_graph_input():
        return "a graph input"
    p = value.producer()
    return f"computed by {p.op_type} '{p.name}'" if p is not None else "unknown"


def _scalar(value: ir.Value | None, legacy_inputs: bool) -> float | str | None:
    """A Clip bound: None when absent, a float when constant, else the reason it is not."""
    if value is None:
        return None
    t = _constant(value, legacy_inputs)
    if t is None:
        return f"'{value.name}' is {_origin(value)}"
    return float(np.asarray(t.numpy()).reshape(-1)[0])


def _clip_bounds(clip: ir.Node, legacy_inputs: bool) -> tuple[float | str | None, float | str | None]:
    if "min" in clip.attributes or "max" in clip.attributes or len(clip.inputs) == 1:
        # Clip before opset 11 holds its bounds as attributes (defaults: no bound).
        lo = clip.attributes.get_float("min", None)
        hi = clip.attributes.get_float("max", None)
        return lo, hi
    ins = list(clip.inputs) + [None, None]
    return _scalar(ins[1], legacy_inputs), _scalar(ins[2], legacy_inputs)


# --- provably non-negative tensors --------------------------------------------------------

# Their outputs are >= 0 whatever the input.
_NONNEG_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Softplus", "Exp", "Abs", "Sqrt", "HardSigmoid"})
# Their output is made of (or averages, or orders) the values of input 0 alone; the other
# inputs are shapes, indices or axes.
_PASS_FIRST = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose",
    "Identity", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Tile", "Expand", "DepthToSpace",
    "SpaceToDepth", "Dropout", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "Cast",
})
# Non-negative when all their inputs are.
_ALL_INPUTS = frozenset({"Concat", "Add", "Sum", "Mean", "Mul", "Div", "Min"})


class _NonNegative:
    """Which values are provably >= 0, with the chain that proves it (or what breaks it)."""

    def __init__(self, graph: ir.Graph, declared: set[str], legacy_inputs: bool):
        self._facts: dict[ir.Value, tuple[bool, str]] = {}
        self._legacy = legacy_inputs
        for v in graph.inputs:
            if v.name in declared:
                self._facts[v] = (True, f"graph input '{v.name}' declared non-negative")
            elif not (legacy_inputs and v.const_value is not None):
                self._facts[v] = (False, f"graph input '{v.name}', not declared non-negative")
        for node in graph:  # graph order is topological
            verdict = self._node(node)
            for out in node.outputs:
                self._facts[out] = verdict

    def of(self, value: ir.Value | None) -> tuple[bool, str]:
        if value is None:
            return False, "missing input"
        if value not in self._facts:
            t = ir.convenience.get_const_tensor(value)
            if t is None:
                self._facts[value] = (False, f"'{value.name}' of unknown origin")
            elif np.all(np.asarray(t.numpy()) >= 0):
                self._facts[value] = (True, f"constant '{value.name}' >= 0")
            else:
                self._facts[value] = (False, f"constant '{value.name}' has negative values")
        return self._facts[value]

    def _node(self, node: ir.Node) -> tuple[bool, str]:
        op, here = node.op_type, f"{node.op_type} '{node.name}'"
        if node.domain not in ("", "ai.onnx"):
            return False, f"{here} of domain {node.domain}"
        if op in _NONNEG_OPS:
            return True, here
        if op == "Clip":
            lo = _clip_bounds(node, self._legacy)[0]
            if isinstance(lo, float) and lo >= 0:
                return True, f"{here} (min {lo:g})"
            return self._chain(here, [node.inputs[0]])
        if op == "LRN":
            # x / (bias + alpha/size * sum x^2)^beta keeps the sign of x when bias > 0.
            if node.attributes.get_float("bias", 1.0) > 0:
                return self._chain(here, [node.inputs[0]])
            return False, f"{here} with bias <= 0"
        if op == "Pad":
            mode = node.attributes.get_string("mode", "constant")
            if mode == "constant":
                fill = node.inputs[2] if len(node.inputs) > 2 else None
                value = _scalar(fill, self._legacy) if fill is not None else node.attributes.get_float("value", 0.0)
                if not isinstance(value, float) or value < 0:
                    return False, f"{here} pads with {value if isinstance(value, float) else 'a non-constant value'}"
            return self._chain(here, [node.inputs[0]])
        if op in ("Resize", "Upsample"):
            # Nearest and (bi)linear interpolation are convex combinations; cubic undershoots.
            if node.attributes.get_string("mode", "nearest") == "cubic":
                return False, f"{here} in cubic mode, which can undershoot below 0"
            return self._chain(here, [node.inputs[0]])
        if op in _PASS_FIRST:
            return self._chain(here, [node.inputs[0]])
        if op in _ALL_INPUTS:
            return self._chain(here, [v for v in node.inputs if v is not None])
        if op == "Max":  # max(a, b) >= a: one non-negative input is enough
            for v in node.inputs:
                if v is not None and self.of(v)[0]:
                    return True, f"{here} <- {self.of(v)[1]}"
            return False, f"{here} of inputs none of which is non-negative"
        if op == "Conv":
            return False, f"{here} (no ReLU after it)"
        return False, here

    def _chain(self, here: str, inputs: Iterable[ir.Value]) -> tuple[bool, str]:
        inputs = list(inputs)
        for v in inputs:
            ok, why = self.of(v)
            if not ok:
                return False, f"{here} <- {why}"
        if len(inputs) == 1:
            return True, f"{here} <- {self.of(inputs[0])[1]}"
        return True, f"{here} of non-negative inputs"


# --- preparing the model -----------------------------------------------------------------


def _prepare(model: onnx.ModelProto | ir.Model) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"{PASS}: expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    m = ir.serde.deserialize_model(model)  # shares the tensors, so `model` stays unchanged
    name_nodes_ir(m)  # the same names normalize gives
    common.ShapeInferencePass()(m)
    return m
