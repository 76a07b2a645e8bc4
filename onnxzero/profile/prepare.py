"""Turn a loaded model into the analysis model every other step works on.

The analysis model is the user's graph with three semantics-preserving changes,
made on our own in-memory copy (the file on disk is never touched):

1. every node has a unique, stable name, given as normalize gives it
   (onnxzero.passes.naming: its own, or its op type when empty, made unique in graph order
   by ``_1``, ``_2``...), so onnxruntime's profiler events map 1:1 onto our nodes and
   a site's name is the key ``rewrite --config`` takes;
2. initializers are no longer listed as graph inputs (IR < 4 models list them
   there; we never feed them, and listing them stops them being constants);
3. all-constant subgraphs (nodes whose inputs are all initializers or outputs
   of such nodes, e.g. the ``ConstantOfShape`` weight generators of the onnx
   model-zoo test models) are evaluated once with ``onnx.reference`` and
   replaced by initializers: they are weights, not inference work.

Only nodes that are entirely constant are folded; the rest of the graph stays
node for node as the user wrote it (no Dropout/Identity elimination, no
fusions), which is why this is not onnxscript's optimizer: that one also
rewrites non-constant nodes, and the per-node table must show the user's nodes.

Big initializers (over 1,024 elements) then move out of the proto into numpy
arrays that onnxruntime takes from memory (``add_external_initializers``), so
no step serializes or parses hundreds of megabytes of weights.

Shapes come from ONNX shape inference (``data_prop=True``) run on a skeleton
of the analysis model (big weights as typed inputs of the same shape), with the batch dimension fixed to
the analysis batch: 1 for a dynamic batch, else the model's own.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzero.errors import UserError
from onnxzero.passes.naming import name_nodes

#: ops whose value changes from run to run: never folded.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
#: int types that hold shapes, axes and indices, not learned weights.
_INDEX_TYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})
_SMALL = 16
#: initializers bigger than this (elements) live in numpy, not in the proto.
_INLINE_LIMIT = 1024
_IN_MEMORY = "onnxzero-in-memory-weights"
_EXTERNAL_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16,
                                                   np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_))

Shape = tuple  # tuple[int | None, ...]


@dataclass
class Prepared:
    """The analysis model plus what we learned about it."""

    model: onnx.ModelProto
    input_name: str
    input_elem_type: int
    input_dims: list[int | None]  # as declared; dim 0 is the batch
    static_batch: int | None  # dim 0 when the model fixes it, else None
    folded: collections.Counter = field(default_factory=collections.Counter)  # op_type -> nodes folded
    renamed: int = 0  # nodes that got an invented name
    constants: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # name -> (dims, dtype)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # big initializers, see _move_weights_out
    small_values: dict[str, np.ndarray] = field(default_factory=dict)  # constants of <= 16 elements
    shapes: dict[str, Shape] = field(default_factory=dict)  # value -> shape at analysis batch
    elem_types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def analysis_batch(self) -> int:
        """Batch the shapes (and so the per-node costs) were computed at."""
        return self.static_batch or 1

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)


def prepare(model: onnx.ModelProto) -> Prepared:
    """Name, unlist initializer inputs, fold constants, infer shapes. Mutates and keeps `model`."""
    g = model.graph
    init_names = {t.name for t in g.initializer}
    real_inputs = [i for i in g.input if i.name not in init_names]
    if len(real_inputs) != len(g.input):
        del g.input[:]
        g.input.extend(real_inputs)
    if len(real_inputs) != 1:  # check_fits has said so already for data; say it for random inputs too
        raise UserError(f"model has {len(real_inputs)} graph inputs, expected exactly 1 image input to feed data to")
    inp = real_inputs[0]
    tt = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if not dims:
        raise UserError(f"model input '{inp.name}' has no shape, expected a batched tensor (N, ...)")

    prep = Prepared(model=model, input_name=inp.name, input_elem_type=tt.elem_type, input_dims=dims,
                    static_batch=dims[0])
    _fold_constants(prep)
    # named after the fold, as normalize names after its own: constant nodes take no names from the rest
    prep.renamed = len(name_nodes(model))
    if model.ir_version < 4:  # initializers outside graph inputs need IR >= 4
        model.ir_version = 4
    _move_weights_out(prep)
    prep.constants = {t.name: (tuple(t.dims), t.data_type) for t in model.graph.initializer}
    prep.small_values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                         if math.prod(t.dims) <= _SMALL and t.data_location != onnx.TensorProto.EXTERNAL}
    prep.shapes, prep.elem_types = infer_shapes(prep)
    return prep


def _is_foldable(n: onnx.NodeProto, const: set[str]) -> bool:
    if n.domain not in ("", "ai.onnx") or n.op_type in _NONDETERMINISTIC:
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
        return False
    return all((not x) or x in const for x in n.input)


def _fold_constants(prep: Prepared) -> None:
    g = prep.model.graph
    const = {t.name for t in g.initializer}
    const_nodes: list[onnx.NodeProto] = []
    for n in g.node:  # ONNX graphs are topologically sorted
        if _is_foldable(n, const):
            const_nodes.append(n)
            const.update(o for o in n.output if o)
    if not const_nodes:
        return
    const_ids = {id(n) for n in const_nodes}
    rest = [n for n in g.node if id(n) not in const_ids]
    produced = [o for n in const_nodes for o in n.output if o]
    needed = {x for n in rest for x in n.input} | {o.name for o in g.output}
    wanted = [o for o in produced if o in needed]
    if wanted:
        used_inits = {x for n in const_nodes for x in n.input}
        sub = helper.make_graph(
            const_nodes, "constants", [], [helper.make_empty_tensor_value_info(o) for o in wanted],
            [t for t in g.initializer if t.name in used_inits])
        sub_model = helper.make_model(sub, opset_imports=prep.model.opset_import,
                                      ir_version=max(prep.model.ir_version, 4))
        try:
            from onnx.reference import ReferenceEvaluator

            values = ReferenceEvaluator(sub_model).run(None, {})
        except Exception as e:  # leave the graph as it is; ORT will run those nodes
            prep.notes.append(f"could not fold {len(const_nodes)} constant-only nodes "
                              f"({type(e).__name__}); they are profiled as ordinary nodes")
            return
    else:
        values = []
    prep.folded = collections.Counter(n.op_type for n in const_nodes)
    del g.node[:]
    g.node.extend(rest)
    for i in reversed(range(len(g.initializer))):  # in place: no copy of the kept weights
        if g.initializer[i].name not in needed:
            del g.initializer[i]
    for name, v in zip(wanted, values, strict=True):
        v = np.asarray(v)
        if v.dtype not in _EXTERNAL_DTYPES or v.size <= _INLINE_LIMIT:  # small or unusual: stays in the proto
            g.initializer.add().CopyFrom(numpy_helper.from_array(v, name))
        else:
            prep.weights[name] = v = np.ascontiguousarray(v)
            g.initializer.add().CopyFrom(_external_ref(name, v))


def _external_ref(name: str, v: np.ndarray) -> onnx.TensorProto:
    """An initializer whose data onnxruntime gets from memory (SessionOptions.add_external_initializers)."""
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(v.dtype), dims=v.shape,
                         data_location=onnx.TensorProto.EXTERNAL)
    for k, val in (("location", _IN_MEMORY), ("offset", "0"), ("length", str(v.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, val
    return t


def _move_weights_out(prep: Prepared) -> None:
    """Big initializers go to prep.weights (numpy) and stay in the proto as in-memory external references.

    The proto is then small: serializing it, shape inference and onnxruntime's
    session creation no longer copy and parse hundreds of megabytes of weights.
    """
    g = prep.model.graph
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or math.prod(t.dims) <= _INLINE_LIMIT:
            continue
        v = numpy_helper.to_array(t)
        if v.dtype not in _EXTERNAL_DTYPES:  # strings, bfloat16, float8...: stay in the proto
            continue
        prep.weights[t.name] = v = np.ascontiguousarray(v)
        t.CopyFrom(_external_ref(t.name, v))


def infer_shapes(prep: Prepared) -> tuple[dict[str, Shape], dict[str, int]]:
    """Shapes (None for unknown dims) and element types of every value, at the analysis batch."""
    m = prep.model
    g = m.graph
    inputs = []
    for i in g.input:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(i)
        if i.name == prep.input_name:
            d0 = vi.type.tensor_type.shape.dim[0]
            d0.Clear()
            d0.dim_value = prep.analysis_batch
        inputs.append(vi)
    inits = []
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:  # big weights: their shape is all inference needs
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            inits.append(t)
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output]
    sk_graph = helper.make_graph(list(g.node), "skeleton", inputs, outputs, inits)
    sk = helper.make_model(sk_graph, opset_imports=m.opset_import, ir_version=m.ir_version)
    sk.functions.extend(m.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except Exception as e:
        prep.notes.append(f"ONNX shape inference failed ({type(e).__name__}); shapes taken from the profiled run")
        inferred = sk
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        types[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
        types[t.name] = t.data_type
    return shapes, types


def is_param_tensor(dims: tuple[int, ...], dtype: int) -> bool:
    """Constants that count as parameters: not scalars (Clip bounds, ...), not int32/int64 (shapes, axes, indices)."""
    return len(dims) > 0 and dtype not in _INDEX_TYPES
