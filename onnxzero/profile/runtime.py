"""Everything that runs the model in onnxruntime.

* per-node latency from onnxruntime's own profiler, in a session with graph
  optimizations disabled so that its kernels map 1:1 onto our graph nodes;
* whole-model latency with onnxruntime's default optimizations (what a user
  gets), timed with a wall clock around ``InferenceSession.run``;
* one pass over the data set with every activation added as a graph output,
  accumulating zero counts and top-1 hits chunk by chunk.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxzero import get_library_path
from onnxzero.profile.activations import ZeroCounter
from onnxzero.profile.progress import Task

_PROVIDERS = ["CPUExecutionProvider"]
#: bytes of activation outputs one chunk of the data pass may hold.
ACTIVATION_BUDGET = 256 * 2**20
MAX_CHUNK = 100


def _options(*, optimize: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # no warnings about unused initializers and the like
    # a rewritten model's onnxzero ops (the library loads in any onnxruntime >= 1.21)
    so.register_custom_ops_library(get_library_path())
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


@dataclass
class NodeTimes:
    latency_ms: dict[str, float]  # node name -> mean kernel time over the profiled runs
    median_ms: dict[str, float]  # node name -> median of the same (robust to a preempted run)
    output_shapes: dict[str, list[tuple[int, ...]]]  # node name -> its outputs' runtime shapes
    runs: int


def open_session(model_bytes: bytes, weights: dict[str, np.ndarray], *, optimize: bool,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session; `weights` are the in-memory initializers the proto refers to (kept alive by the caller)."""
    so = _options(optimize=optimize)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    values = [ort.OrtValue.ortvalue_from_numpy(v) for v in weights.values()]  # no copy: views of the arrays
    if weights:
        so.add_external_initializers(list(weights), values)
    sess = ort.InferenceSession(model_bytes, so, providers=_PROVIDERS)
    sess._onnxzero_weights = values  # keep the views (and so the arrays) alive as long as the session
    return sess


def profile_nodes(sess: ort.InferenceSession, input_name: str, feed: np.ndarray, fetch: list[str], runs: int,
                  task: Task) -> NodeTimes:
    """Mean per-node kernel time over `runs` runs after one uncounted warmup run; ends the session's profiling.

    The session must have been opened with a profile_prefix; it can be used on
    (unprofiled) afterwards.
    """
    for _ in range(runs + 1):
        sess.run(fetch, {input_name: feed})
        task.advance()
    path = sess.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    return parse_profile(events)


def parse_profile(events: list[dict]) -> NodeTimes:
    """Sum `<node>_kernel_time` events per node and run; mean and median over all runs but the first."""
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    starts = [e["ts"] for e in run_events]
    timed = max(len(run_events) - 1, 1)
    per_run: dict[str, np.ndarray] = {}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    suffix = "_kernel_time"
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(suffix):
            continue
        name = e["name"][: -len(suffix)]
        idx = bisect.bisect_right(starts, e["ts"]) - 1
        if idx < 0:
            continue
        if idx == 0:  # warmup: keep its shapes, not its time
            outs = e.get("args", {}).get("output_type_shape", [])
            shapes[name] = [tuple(next(iter(o.values()))) if o else () for o in outs]
            continue
        per_run.setdefault(name, np.zeros(timed))[idx - 1] += float(e["dur"]) / 1000.0
    return NodeTimes({k: float(v.mean()) for k, v in per_run.items()},
                     {k: float(np.median(v)) for k, v in per_run.items()}, shapes, timed)


def time_model(sess: ort.InferenceSession, input_name: str, feed: np.ndarray, runs: int, task: Task) -> list[float]:
    """Wall-clock ms of `runs` runs (all outputs fetched), after one warmup run."""
    sess.run(None, {input_name: feed})
    task.advance()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {input_name: feed})
        times.append((time.perf_counter() - t0) * 1000.0)
        task.advance()
    return times


def with_outputs(model_bytes: bytes, names: list[str], elem_types: dict[str, int]) -> bytes:
    """`model_bytes` with `names` appended as graph outputs (no shapes, just element types).

    Protobuf merges a message's serializations when they are concatenated
    (repeated fields append, embedded messages merge): this appends a small
    ModelProto holding only the extra graph outputs.
    """
    extra = onnx.ModelProto()
    extra.graph.output.extend(
        helper.make_tensor_value_info(n, elem_types.get(n) or onnx.TensorProto.FLOAT, None) for n in names)
    return model_bytes + extra.SerializeToString()


def chunks(x: np.ndarray, size: int, static_batch: int | None) -> Iterator[tuple[int, np.ndarray, int]]:
    """(start, batch, n_valid); a model with a fixed batch gets zero-padded batches of exactly that size."""
    step = static_batch or size
    for s in range(0, len(x), step):
        part = x[s: s + step]
        n = len(part)
        if static_batch and n < static_batch:
            part = np.concatenate([part, np.zeros((static_batch - n, *part.shape[1:]), part.dtype)])
        yield s, np.ascontiguousarray(part), n


@dataclass
class DataPass:
    counters: dict[str, ZeroCounter]  # activation value name -> counts
    correct: int | None  # top-1 hits, None without labels or usable logits
    samples: int
    chunk: int
    fell_back: bool  # a dynamic batch that only ran at batch 1


def run_data(sess: ort.InferenceSession, input_name: str, inputs: np.ndarray, cls_idx: np.ndarray | None,
             n_classes: int, labels: np.ndarray | None, act_names: list[str], logits_name: str,
             static_batch: int | None, chunk: int, task: Task) -> DataPass:
    out_names = list(dict.fromkeys([logits_name, *act_names]))
    fell_back = False
    while True:
        counters = {n: ZeroCounter(n_classes) for n in act_names}
        correct = 0 if labels is not None else None
        try:
            for start, batch, n in chunks(inputs, chunk, static_batch):
                outs = dict(zip(out_names, sess.run(out_names, {input_name: batch}), strict=True))
                idx = cls_idx[start: start + n] if cls_idx is not None else None
                for name in act_names:
                    counters[name].add(outs[name], len(batch), n, idx)
                if correct is not None:
                    logits = outs[logits_name]
                    if logits.ndim >= 1 and logits.shape[0] >= n and logits[:n].size:
                        pred = logits[:n].reshape(n, -1).argmax(axis=1)
                        correct += int((pred == labels[start: start + n]).sum())
                    else:
                        correct = None
                task.advance(n)
        except Exception:
            # A "dynamic" batch that the graph does not honour (e.g. Reshape to [1, -1]): go one by one.
            if static_batch is None and chunk > 1:
                chunk, fell_back = 1, True
                task.reset()
                continue
            raise
        return DataPass(counters, correct, len(inputs), chunk, fell_back)
