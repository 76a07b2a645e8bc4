"""SparseQuantConv: Conv(+bias)+ReLU from pruned, 8-bit dynamic fixed point weights.

The weight format is the one behind Table II of the pruning-quantization-sparsity paper
(../shared/papers/pruning-quantization-sparsity-activation.txt): magnitude pruning, 8-bit
dynamic fixed point weights with one fractional length per layer, and an 8-bit *relative*
sparse index with a filler zero inserted wherever a gap does not fit in 8 bits.

Format (what `compress` produces, the C++ kernel validates and this module's `reference` defines):

* Pruning: weights with |w| < threshold become 0.
* Quantization: one fractional length fl per layer (`frac_bits`), the largest integer for which the
  largest magnitude fits in int8: round(max|w| * 2^fl) <= 127. Every weight becomes
  q = clip(round(w * 2^fl), -128, 127) and stands for q * 2^-fl. Kept weights that round to q = 0
  are dropped too (they are zero after quantization).
* Per filter k (output channel), the nonzero q in flattened (c, kh, kw) order (position
  pos = (c*KH + kh)*KW + kw, c within the group, CRS = C/group*KH*KW positions) are stored as
  entries (values: int8 q, index: uint8 gap) where gap = pos - previous_pos, previous_pos = -1
  before the filter's first entry; so gap is in [1, 255]. When the distance to the next nonzero
  exceeds 255, a filler entry (value 0, gap 255) is inserted first (as many as needed); value 0
  appears only in fillers. `row_ptr` (int64, K+1) holds the offset of each filter's first entry.
* Compression rate, the paper's equation (1): CR = 100 / (%W_Z * (8 + 8) / 32), where %W_Z is the
  stored entries (fillers included) as a percentage of the dense weight count.

The op: inputs 0 X, 1 values (int8), 2 index (uint8), 3 row_ptr (int64), 4 B (optional), all but X
constant; attributes: the Conv attributes with kernel_shape required, `weight_shape`
(K, C/group, KH, KW) (and/or `channels` = C/group) and `frac_bits`. Output 1 `macs` = N * OH * OW *
(number of nonzero entries): each kept weight is multiplied at every output position.

At 0% pruning this is a slower path than a dense GEMM (no reuse of an input load across filters,
8-bit weights converted per term): use it for pruned layers.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxzero.ops.spec import OPS
from onnxzero.ops.early_exit import conv_relu_reference

OP = "SparseQuantConv"
MAX_GAP = 255
# Above this fraction of nonzero weights the kernel runs the dense path on the dequantized weights
# (faster than its sparse kernel there); on small maps (fewer than SMALL_MAP output positions per
# image) above DENSE_ABOVE_SMALL; with a reduction C/group*KH*KW shorter than SHORT_REDUCTION always.
# = kDenseAbove, kDenseAboveSmall, kSmallMap, kShortReduction in sparse_quant_conv.cc.
DENSE_ABOVE = 0.6
DENSE_ABOVE_SMALL = 0.3
SMALL_MAP = 32
SHORT_REDUCTION = 32


def dense_above(positions: int | None, reduction: int) -> float:
    """The kernel's density threshold for its dense path at `positions` = OH*OW output positions per image
    (None: a map of at least SMALL_MAP) and a reduction length C/group*KH*KW."""
    if reduction < SHORT_REDUCTION:
        return -1.0
    return DENSE_ABOVE_SMALL if positions is not None and positions < SMALL_MAP else DENSE_ABOVE

__all__ = ["DENSE_ABOVE", "DENSE_ABOVE_SMALL", "SHORT_REDUCTION", "SMALL_MAP", "OP", "dense_above", "compress", "kernel_macs_per_position", "compression_stats", "decompress", "frac_bits_for", "make_node", "reference"]


def frac_bits_for(max_abs: float) -> int:
    """The largest fractional length fl (in [-64, 64]) with round(max_abs * 2^fl) <= 127."""
    m = float(max_abs)
    if not np.isfinite(m):
        raise ValueError(f"{OP}: weights must be finite, got max |w| = {m}")
    if m == 0.0:
        return 0
    fl = int(np.floor(np.log2(127.0 / m)))
    while fl < 64 and np.round(m * 2.0 ** (fl + 1)) <= 127:
        fl += 1
    while fl > -64 and np.round(m * 2.0 ** fl) > 127:
        fl -= 1
    return int(np.clip(fl, -64, 64))


def compress(w: np.ndarray, *, threshold: float) -> dict:
    """Prune |w| < threshold, quantize to 8-bit dynamic fixed point, encode the relative sparse index.

    Returns {"values": int8 (L,), "index": uint8 (L,), "row_ptr": int64 (K+1,), "frac_bits": int,
    "weight_shape": (K, C/group, KH, KW), "threshold": float}.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 4:
        raise ValueError(f"{OP}: weights have shape {w.shape}, expected (K, C/group, KH, KW)")
    K = w.shape[0]
    flat = w.reshape(K, -1).astype(np.float64)
    kept = np.abs(flat) >= threshold
    fl = frac_bits_for(np.abs(flat[kept]).max() if kept.any() else 0.0)
    q = np.clip(np.round(flat * 2.0 ** fl), -128, 127).astype(np.int64)
    q[~kept] = 0
    ks, ps = np.nonzero(q)  # row-major: sorted by filter, then position
    qs = q[ks, ps]
    prev = np.empty_like(ps)
    prev[1:] = ps[:-1]
    if len(ps):
        prev[0] = -1
        starts = np.ones(len(ks), bool)
        starts[1:] = ks[1:] != ks[:-1]
        prev[starts] = -1
    gap = ps - prev
    nfill = (gap - 1) // MAX_GAP
    per = nfill + 1                       # stored entries per nonzero (its fillers, then itself)
    owner = np.repeat(np.arange(len(ps)), per)
    first = np.cumsum(per) - per
    j = np.arange(owner.size) - first[owner]
    filler = j < nfill[owner]
    values = np.where(filler, 0, qs[owner]).astype(np.int8)
    index = np.where(filler, MAX_GAP, gap[owner] - MAX_GAP * nfill[owner]).astype(np.uint8)
    counts = np.bincount(ks, weights=per, minlength=K).astype(np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return {"values": values, "index": index, "row_ptr": row_ptr, "frac_bits": int(fl),
            "weight_shape": tuple(int(d) for d in w.shape), "threshold": float(threshold)}


def _positions(c: dict) -> tuple[np.ndarray, np.ndarray]:
    """(filter, position) of every stored entry, after validating the stream like the kernel does."""
    values, index, row_ptr = (np.asarray(c[k]) for k in ("values", "index", "row_ptr"))
    K, Cg, KH, KW = c["weight_shape"]
    crs = Cg * KH * KW
    if values.shape != index.shape or values.ndim != 1:
        raise ValueError(f"{OP}: values {values.shape} and index {index.shape} must be 1-D of one length")
    if row_ptr.shape != (K + 1,) or row_ptr[0] != 0 or row_ptr[-1] != len(values) or np.any(np.diff(row_ptr) < 0):
        raise ValueError(f"{OP}: row_ptr must be non-decreasing from 0 to {len(values)} with {K + 1} entries")
    if np.any(index == 0):
        raise ValueError(f"{OP}: index has a 0 gap, expected gaps in [1, 255]")
    if np.any((values == 0) & (index != MAX_GAP)):
        raise ValueError(f"{OP}: value 0 with a gap other than 255 (0 only in fillers)")
    owner = np.repeat(np.arange(K), np.diff(row_ptr))
    csum = np.cumsum(index.astype(np.int64))
    base = np.concatenate([[0], csum])[row_ptr[:-1]]
    pos = csum - base[owner] - 1
    if len(pos) and pos.max() >= crs:
        raise ValueError(f"{OP}: gaps reach position {pos.max()}, expected < C/group*KH*KW = {crs}")
    return owner, pos


def decompress(c: dict) -> np.ndarray:
    """The dense float32 weights (K, C/group, KH, KW) the compressed form stands for (dequantized)."""
    K, Cg, KH, KW = c["weight_shape"]
    owner, pos = _positions(c)
    w = np.zeros((K, Cg * KH * KW), np.float64)
    v = np.asarray(c["values"]).astype(np.float64) * 2.0 ** (-int(c["frac_bits"]))
    nz = v != 0
    w[owner[nz], pos[nz]] = v[nz]
    return w.reshape(K, Cg, KH, KW).astype(np.float32)


def compression_stats(w: np.ndarray, compressed: dict) -> dict:
    """%W_Z (stored entries incl. fillers, % of the dense weights), CR (paper eq. 1) and counts."""
    dense = int(np.asarray(w).size)
    values = np.asarray(compressed["values"])
    entries = int(values.size)
    fillers = int(np.count_nonzero(values == 0))
    pct = 100.0 * entries / dense
    return {
        "%W_Z": pct,
        "CR": (100.0 / (pct * (8 + 8) / 32)) if entries else float("inf"),
        "entries": entries,
        "fillers": fillers,
        "nonzeros": entries - fillers,
        "weights": dense,
        "frac_bits": int(compressed["frac_bits"]),
    }


def reference(x: np.ndarray, compressed: dict, b: np.ndarray | None = None, *, other: np.ndarray | None = None,
              strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
              auto_pad: str = "NOTSET") -> tuple[np.ndarray, int]:
    """(y, macs): ReLU(conv(x, decompress(compressed)) + b [+ other]) in float64, and N*OH*OW*nonzeros.

    other: the residual input (N, K, OH, OW) of a residual site, added before the ReLU."""
    w = decompress(compressed).astype(np.float64)
    y = conv_relu_reference(x, w, b, strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad,
                            other=other)
    nnz = int(np.count_nonzero(np.asarray(compressed["values"])))
    N, _, OH, OW = y.shape
    return y.astype(np.float32), N * OH * OW * nnz


def kernel_macs_per_position(compressed: dict, sparse_path: int | None = None, positions: int | None = None) -> int:
    """The op's `macs` per output position (N*OH*OW of them): the nonzero weights on the sparse path,
    every weight on the dense one (sparse_path 0, or None above dense_above(positions, ...) nonzeros;
    positions: OH*OW of one image, None = a large map)."""
    K, Cg, KH, KW = compressed["weight_shape"]
    dense = K * Cg * KH * KW
    nnz = int(np.count_nonzero(np.asarray(compressed["values"])))
    use_dense = sparse_path == 0 or (sparse_path in (None, -1) and nnz > dense_above(positions, Cg * KH * KW) * dense)
    return dense if use_dense else nnz


def make_node(x: str, w_name: str, b_name: str | None, y: str, *, compressed: dict, macs_output: str | None = None,
              other: str | None = None, sparse_path: int | None = None, kernel_shape=None, strides=(1, 1), pads=None, dilations=(1, 1), group: int = 1,
              auto_pad: str = "NOTSET", name: str | None = None) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """The SparseQuantConv node and its initializers {w_name_values, w_name_index, w_name_row_ptr}.

    `compressed` is what `compress` returned; b_name names an existing (K,) float initializer or None;
    other: the residual operand's tensor name at a residual site (input 5), or None.
    sparse_path: 1 = always the sparse kernel (macs = N*OH*OW*nonzeros), 0 = always the dense GEMM on the
    dequantized weights (macs = N*OH*OW*K*C/group*KH*KW), None = by density (dense above 60% nonzeros).
    """
    K, Cg, KH, KW = compressed["weight_shape"]
    if kernel_shape is not None and tuple(kernel_shape) != (KH, KW):
        raise ValueError(f"{OP}: kernel_shape {tuple(kernel_shape)} does not match the weights' {(KH, KW)}")
    inits = {
        f"{w_name}_values": np.asarray(compressed["values"], np.int8),
        f"{w_name}_index": np.asarray(compressed["index"], np.uint8),
        f"{w_name}_row_ptr": np.asarray(compressed["row_ptr"], np.int64),
    }
    inputs = {"X": x, **dict(zip(("values", "index", "row_ptr"), inits)), "B": b_name, "other": other}
    attrs = {"kernel_shape": [KH, KW], "strides": list(strides), "dilations": list(dilations), "group": int(group),
             "weight_shape": [K, Cg, KH, KW], "channels": Cg, "frac_bits": int(compressed["frac_bits"])}
    if sparse_path is not None:
        if sparse_path not in (-1, 0, 1):
            raise ValueError(f"{OP}: sparse_path is {sparse_path!r}, expected -1, 0 or 1")
        attrs["sparse_path"] = int(sparse_path)
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads) if pads is not None else [0, 0, 0, 0]
    outputs = [y] + ([macs_output] if macs_output else [])
    node = OPS[OP].node(inputs, outputs, name=name or f"{OP}_{y}", **attrs)
    return node, inits
