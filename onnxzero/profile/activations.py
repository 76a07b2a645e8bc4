"""Which outputs are ReLU outputs, and exact zero counts over a data set.

An activation is the output of a ``Relu``, or of a ``Clip`` whose lower bound
is exactly 0 (ReLU6 and friends): ``min`` is an attribute up to opset 6 and an
optional constant input from opset 11 on. Sites (where a zero-skipping
convolution could avoid computing outputs the activation throws away) are the
rewrite's own: onnxzero.passes.sites finds them.

Counts are accumulated batch by batch (no activation is kept): per output
channel (axis 1) and, when labels are given, per class and channel. Rates are
exact: number of elements equal to 0.0 divided by the number of elements.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxzero.profile.prepare import Prepared


def _clip_min(node: onnx.NodeProto, prep: Prepared) -> float | None:
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            return float(a.f)
    if len(node.input) > 1 and node.input[1]:
        v = prep.small_values.get(node.input[1])
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None  # else computed: unknown
    return None  # no lower bound


def is_relu_like(node: onnx.NodeProto, prep: Prepared) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Relu":
        return True
    return node.op_type == "Clip" and _clip_min(node, prep) == 0.0


def activation_nodes(prep: Prepared) -> list[onnx.NodeProto]:
    return [n for n in prep.model.graph.node if is_relu_like(n, prep) and n.output and n.output[0]]


def bn_relu_chains(prep: Prepared) -> int:
    """How many Conv -> BatchNormalization -> ReLU chains hide sites (for a note)."""
    g = prep.model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    count = 0
    for n in g.node:
        if not is_relu_like(n, prep):
            continue
        bn = producer.get(n.input[0])
        if bn is not None and bn.op_type == "BatchNormalization":
            conv = producer.get(bn.input[0])
            count += conv is not None and conv.op_type == "Conv"
    return count


class ZeroCounter:
    """Exact zero counts of one activation, accumulated over batches."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.samples = 0
        self.spatial = 0  # elements per channel per sample
        self.channels = 0
        self.zeros_ch: np.ndarray | None = None  # [C] int64
        self.zeros_cls_ch: np.ndarray | None = None  # [K, C] int64
        self.skipped = False

    def add(self, a: np.ndarray, fed: int, n_valid: int, cls_idx: np.ndarray | None) -> None:
        """Count one batch of `fed` samples (the first n_valid real, the rest padding); batch on axis 0."""
        if self.skipped:
            return
        if a.ndim == 0 or a.shape[0] != fed:  # the batch is not on axis 0: no per-sample counts
            self.skipped = True
            return
        a = a[:n_valid]
        c = a.shape[1] if a.ndim >= 2 else 1
        per = (a.reshape(n_valid, c, -1) == 0).sum(axis=2, dtype=np.int64)  # [n, C]
        if self.zeros_ch is None:
            self.channels, self.spatial = c, int(np.prod(a.shape[2:], dtype=np.int64)) if a.ndim > 2 else 1
            self.zeros_ch = np.zeros(c, np.int64)
            if self.n_classes:
                self.zeros_cls_ch = np.zeros((self.n_classes, c), np.int64)
        elif c != self.channels:
            self.skipped = True
            return
        self.zeros_ch += per.sum(axis=0)
        if self.zeros_cls_ch is not None and cls_idx is not None:
            np.add.at(self.zeros_cls_ch, cls_idx[:n_valid], per)
        self.samples += n_valid

    # rates ------------------------------------------------------------------
    def zero_rate(self) -> float:
        if self.zeros_ch is None or not self.samples or self.skipped:
            return float("nan")
        return float(self.zeros_ch.sum() / (self.samples * self.channels * self.spatial))

    def per_channel(self) -> list[float]:
        if self.zeros_ch is None or not self.samples or self.skipped:
            return []
        return [float(v) for v in self.zeros_ch / (self.samples * self.spatial)]

    def per_class_channel(self, class_counts: np.ndarray) -> np.ndarray | None:
        """[K, C] zero rates; NaN rows for classes without samples."""
        if self.zeros_cls_ch is None or self.skipped:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.zeros_cls_ch / (class_counts[:, None] * self.spatial)

    def per_class(self, class_counts: np.ndarray) -> np.ndarray | None:
        if self.zeros_cls_ch is None or self.skipped:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.zeros_cls_ch.sum(axis=1) / (class_counts * self.channels * self.spatial)
