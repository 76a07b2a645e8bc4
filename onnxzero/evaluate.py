"""Evaluate: run a (rewritten) model on a data set in onnxruntime and measure it.

Accuracy, the MACs the custom ops report through their `macs` outputs, and
latency all come from real runs; nothing here estimates. One Evaluator holds
one session, so a search can feed many settings (runtime inputs) without
rebuilding it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxzero import DOMAIN

MACS_SUFFIX = "__macs"


def macs_output_name(node: onnx.NodeProto) -> str:
    """The output through which an onnxzero op's MAC counter is read (expose_macs adds it if absent)."""
    return node.output[1] if len(node.output) > 1 and node.output[1] else f"{node.output[0]}{MACS_SUFFIX}"


def expose_macs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose every onnxzero op writes its MAC counter to a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = []
    for node in m.graph.node:
        if node.domain != DOMAIN:
            continue
        if len(node.output) < 2 or not node.output[1]:
            out = macs_output_name(node)
            if len(node.output) < 2:
                node.output.append(out)
            else:
                node.output[1] = out
        names.append(node.output[1])
        m.graph.output.append(helper.make_tensor_value_info(node.output[1], TensorProto.INT64, []))
    return m, names


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy that also returns the intermediate tensors `names` (float)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def session(model: onnx.ModelProto, *, threads: int = 0, library: bool = True,
            optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    from onnxzero.ops.session import make_session

    return make_session(model, threads=threads, library=library, optimization=optimization)


@dataclass
class RunResult:
    logits: np.ndarray
    macs: int                       # per sample, summed over the custom ops (0 when there are none)
    site_macs: dict[str, int]       # per custom-op node output, per sample
    extras: dict[str, np.ndarray]


class Evaluator:
    """One onnxruntime session over `model`, run over a data set in batches.

    A model exported with a fixed batch B (torch.onnx.export without dynamic axes) only runs
    on batches of exactly B: the data then goes in chunks of B, the last one zero-padded, and
    what the padding produced (logits, extra outputs, MACs) is dropped.
    """

    def __init__(self, model: onnx.ModelProto, *, extra_outputs: list[str] | None = None, threads: int = 0,
                 batch_size: int = 250):
        counted, self.macs_outputs = expose_macs(model)
        self.extra_outputs = list(extra_outputs or [])
        counted = with_outputs(counted, self.extra_outputs)
        self.session = session(counted, threads=threads)
        init = {i.name for i in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in init)
        self.logits_name = model.graph.output[0].name
        self.static_batch = fixed_batch(model)
        self.batch_size = self.static_batch or batch_size

    def _run(self, names: list[str], x: np.ndarray, feeds: dict[str, np.ndarray] | None) -> list:
        return self.session.run(names, {self.input_name: x, **(feeds or {})})

    def run(self, inputs: np.ndarray, *, feeds: dict[str, np.ndarray] | None = None) -> RunResult:
        try:
            return self._run_all(inputs, feeds)
        except Exception:
            # A batch declared dynamic that the graph does not honour (an export that reshapes to
            # [1, -1]): run one sample at a time from now on; a failure then is the model's own.
            if self.static_batch or self.batch_size == 1 or len(inputs) < 2:
                raise
            self.batch_size = 1
            return self._run_all(inputs, feeds)

    def _run_all(self, inputs: np.ndarray, feeds: dict[str, np.ndarray] | None) -> RunResult:
        names = [self.logits_name, *self.macs_outputs, *self.extra_outputs]
        logits, extras = [], {n: [] for n in self.extra_outputs}
        site_macs = dict.fromkeys(self.macs_outputs, 0)
        padded = 0
        for i in range(0, len(inputs), self.batch_size):
            x = inputs[i:i + self.batch_size]
            n = len(x)
            if self.static_batch and n < self.static_batch:
                padded = self.static_batch - n
                x = np.concatenate([x, np.zeros((padded, *x.shape[1:]), x.dtype)])
            out = self._run(names, x, feeds)
            logits.append(_valid(out[0], n, len(x)))
            for name, v in zip(self.macs_outputs, out[1:1 + len(self.macs_outputs)]):
                site_macs[name] += int(v)
            for name, v in zip(self.extra_outputs, out[1 + len(self.macs_outputs):]):
                extras[name].append(_valid(v, n, len(x)))
        if padded and self.macs_outputs:
            # The counters sum over the whole batch, padding included. An op's count for one sample
            # does not depend on the batch's other samples, so a batch of only zero samples gives
            # the padding's share exactly.
            zeros = np.zeros((self.static_batch, *inputs.shape[1:]), inputs.dtype)
            out = self._run(self.macs_outputs, zeros, feeds)
            for name, v in zip(self.macs_outputs, out):
                site_macs[name] -= int(v) // self.static_batch * padded
        n = max(1, len(inputs))
        per_sample = {k: v // n for k, v in site_macs.items()}
        return RunResult(logits=np.concatenate(logits), macs=sum(per_sample.values()), site_macs=per_sample,
                         extras={k: np.concatenate(v) for k, v in extras.items()})

    def latency_ms(self, sample: np.ndarray, *, runs: int = 20, feeds: dict[str, np.ndarray] | None = None) -> float:
        """Median wall-clock latency of one inference on `sample` (batch as given, or the model's fixed batch)."""
        return median_latency_ms(self.session, {self.input_name: sample, **(feeds or {})}, runs=runs)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's image input fixes (dimension 0), or None when it is dynamic."""
    init = {i.name for i in model.graph.initializer}
    inp = next((i for i in model.graph.input if i.name not in init), None)
    dims = inp.type.tensor_type.shape.dim if inp is not None else []
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def _valid(v: np.ndarray, n: int, fed: int) -> np.ndarray:
    """The rows of the n real samples of a batch of `fed` (outputs without the batch on axis 0 stay whole)."""
    return v[:n] if n < fed and v.ndim and v.shape[0] == fed else v


def fit_batch(feeds: dict[str, np.ndarray], sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Feeds whose batch matches each session input's fixed batch: the sample repeated (or cut) to it.

    Latency of a fixed-batch model is the latency of one run at its batch; repeating the real
    sample keeps the data (and so the skipped work) representative.
    """
    out = dict(feeds)
    for i in sess.get_inputs():
        v = out.get(i.name)
        b = i.shape[0] if i.shape else None
        if v is None or not isinstance(b, int) or b <= 0 or v.ndim != len(i.shape) or v.shape[0] == b:
            continue
        out[i.name] = np.ascontiguousarray(np.resize(v, (b, *v.shape[1:])))
    return out


def median_latency_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], *, runs: int = 20) -> float:
    feeds = fit_batch(feeds, sess)
    sess.run(None, feeds)  # warm-up: first-run allocations and packing
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))
