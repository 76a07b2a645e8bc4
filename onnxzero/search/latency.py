"""Whole-model latency, measured as the model will be deployed.

The search never times an op alone: an op that beats onnxruntime's Conv+Relu in isolation can still
slow the model down, because onnxruntime keeps its own convs in the blocked NCHWc layout, fuses
Conv+Add+Relu, and has to insert reorders around every custom op. So every latency figure the search
uses is the whole model (onnxruntime's default graph optimizations on) against the original model,
in one process, alternating runs so machine noise hits both alike.

A measurer is any object with `compare(model, original, sample, *, runs) -> (model_ms, original_ms)`;
the search's decisions depend only on that, so tests inject a deterministic one to check the decision
logic, and the real one (OrtMeasurer) runs onnxruntime.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import onnx

from onnxzero.evaluate import fit_batch, session


class Measurer(Protocol):
    def compare(self, model: onnx.ModelProto, original: onnx.ModelProto, sample: np.ndarray, *,
                runs: int) -> tuple[float, float]:
        """Median latencies (ms) of `model` and `original` on `sample`."""


def input_name(model: onnx.ModelProto) -> str:
    init = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in init)


class OrtMeasurer:
    """onnxruntime, default graph optimizations, `threads` intra-op threads, spinning off for both
    sides (make_session), runs interleaved A, B, A, B ...

    The ratio is the median of the per-pair ratios, not the ratio of the medians: on a shared machine
    the load drifts, and a pair run back to back sees the same load. Small models get more pairs,
    until `min_seconds` of measuring, so that their ratios are as stable as a large model's."""

    def __init__(self, *, threads: int = 2, warmup: int = 3, min_seconds: float = 0.25, max_factor: int = 10):
        self.threads, self.warmup, self.min_seconds, self.max_factor = threads, warmup, min_seconds, max_factor
        self._original: tuple[int, object] | None = None  # the original's session, built once

    def _original_session(self, original: onnx.ModelProto):
        if self._original is None or self._original[0] != id(original):
            self._original = (id(original), session(original, threads=self.threads, library=False))
        return self._original[1]

    def compare(self, model, original, sample, *, runs):
        a, b = session(model, threads=self.threads), self._original_session(original)
        # a fixed-batch export is timed at its own batch, both sides alike
        fa, fb = fit_batch({input_name(model): sample}, a), fit_batch({input_name(original): sample}, b)
        for _ in range(self.warmup):
            a.run(None, fa)
            b.run(None, fb)
        ta, tb = [], []
        start = time.perf_counter()
        i = 0
        while i < runs or (time.perf_counter() - start < self.min_seconds and i < runs * self.max_factor):
            # alternate which side goes first so a periodic disturbance favours neither
            for sess, feeds, acc in ((a, fa, ta), (b, fb, tb)) if i % 2 == 0 else ((b, fb, tb), (a, fa, ta)):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                acc.append(time.perf_counter() - t0)
            i += 1
        ratio = float(np.median(np.asarray(ta) / np.asarray(tb)))
        base = float(np.median(tb) * 1e3)
        return ratio * base, base


def batch_sample(inputs: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` samples (repeated when the data has fewer)."""
    reps = -(-batch // len(inputs))
    return np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch] if reps > 1 else inputs[:batch])
