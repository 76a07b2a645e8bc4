"""Build one-op models and sessions with the library registered (tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION, get_library_path


@dataclass(frozen=True)
class ConvGeometry:
    """A resolved 2-D convolution for one image, as the kernels compute it."""

    C: int
    H: int
    W: int
    K: int
    KH: int
    KW: int
    OH: int
    OW: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    group: int

    @property
    def macs(self) -> int:
        return self.K * self.OH * self.OW * (self.C // self.group) * self.KH * self.KW


def conv_geometry(x_shape, w_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
                  auto_pad: str = "NOTSET") -> ConvGeometry:
    """ONNX Conv's output-size rules (auto_pad included), mirrored by the C++ ResolveConv."""
    _, C, H, W = x_shape
    K, _, KH, KW = w_shape
    ekh, ekw = (KH - 1) * dilations[0] + 1, (KW - 1) * dilations[1] + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pt_pb = []
        for n, s, ek in ((H, strides[0], ekh), (W, strides[1], ekw)):
            out = -(-n // s)
            total = max(0, (out - 1) * s + ek - n)
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pt_pb.append((lo, total - lo))
        pads = (pt_pb[0][0], pt_pb[1][0], pt_pb[0][1], pt_pb[1][1])
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    OH = (H + pads[0] + pads[2] - ekh) // strides[0] + 1
    OW = (W + pads[1] + pads[3] - ekw) // strides[1] + 1
    return ConvGeometry(C, H, W, K, KH, KW, OH, OW, tuple(strides), tuple(dilations), tuple(pads), group)


def single_op_model(node: onnx.NodeProto, initializers: dict[str, np.ndarray], x_shape, *,
                    runtime_inputs: dict[str, tuple[int, list]] | None = None,
                    outputs: list[str] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A model holding one node: graph input X (batch dim symbolic), constants as initializers.

    runtime_inputs: extra graph inputs {name: (TensorProto elem type, shape)} fed at run time.
    outputs: graph output names (default: the node's outputs, all float except a `macs` output).
    """
    inputs = [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["N", *x_shape[1:]])]
    for name, (elem, shape) in (runtime_inputs or {}).items():
        inputs.append(helper.make_tensor_value_info(name, elem, shape))
    outs = []
    for name in outputs or [o for o in node.output if o]:
        elem = TensorProto.INT64 if name.endswith("macs") else TensorProto.FLOAT
        outs.append(helper.make_tensor_value_info(name, elem, None))
    graph = helper.make_graph([node], "single_op", inputs, outs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    opsets = [helper.make_opsetid("", opset)]
    if node.domain == DOMAIN:
        opsets.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return helper.make_model(graph, opset_imports=opsets)


def make_session(model: onnx.ModelProto, *, threads: int = 0,
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 library: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = optimization
    # Settings fed at run time are initializers listed as graph inputs on purpose; onnxruntime
    # warns about each of them, so only errors are logged.
    so.log_severity_level = 3
    # Measurements alternate between sessions (op vs onnxruntime, optimized vs original); a
    # session whose pool keeps spinning after its run steals the other's cores on a 2-core box.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
