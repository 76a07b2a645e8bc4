"""SpatialConv: Conv(+bias)+ReLU with spatial zero prediction (Shomron et al.; the greedy-optimizer paper).

Semantics (this module's `reference` defines them; the C++ kernel follows it):

* The output of every channel, (OH, OW), is cut into non-overlapping p x p patches, p = attribute
  `patch` in 2..4, starting at (0, 0). A partial patch at the right/bottom margin is still a patch;
  its out-of-range positions are ignored (the paper's "padded margins").
* Input `mask` (uint8, 0/1) marks the positions of every patch that are computed first. Its shape
  picks the granularity (the optimizer's modes):
    (p, p)      one pattern for the whole layer            (uniform-layer)
    (K, p, p)   one pattern per output channel             (uniform-filter)
    (K, OH, OW) a full mask: every patch of every channel has its own pattern (uniform-patch / max
                granularity); the pattern of patch (i, j) of channel k is mask[k, i*p:(i+1)*p, j*p:(j+1)*p].
* For each (image, channel, patch): the masked in-range positions are computed; if all of them are
  zero after ReLU (pre-activation <= 0), the rest of the patch is predicted zero and never computed;
  otherwise the rest is computed too. A patch whose pattern selects no in-range position (all-zero
  pattern, or the 1s fall outside a margin patch) is computed in full: no prediction. An all-ones
  mask therefore computes everything: exactly Conv+ReLU.
* Optional last input `other` (float32, (N, K, OH, OW), a run-time tensor: the residual of a
  Conv -> Add(other) -> Relu site): every position above is a position of the sum, i.e. the
  output is ReLU(conv + B + other) where computed, a patch is predicted zero when its masked
  positions of the sum are all <= 0, and predicted-zero positions are 0 in the output.
* NaN/Inf in X or other behave as in Conv(+Add)+Relu: an output is NaN where the sum is NaN
  (ReLU keeps NaN, like onnxruntime's), and no value reaches an output outside its receptive field.
  A NaN at a masked position stays NaN but does not make its patch alive (NaN > 0 is false).
* Output `macs` (int64 scalar): multiply-accumulates actually performed = (number of output elements
  computed) x C/group x KH x KW, summed over the batch. The kernel skips at the same (channel, patch)
  granularity and computes exactly the same set of outputs, so its counter equals this one.

The mask may be a constant initializer or a runtime input (the optimizer feeds it per run to try
masks without rebuilding sessions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from onnxzero.ops.spec import OPS
from onnxzero.ops.conv_relu import conv2d, layout_attributes
from onnxzero.ops.session import conv_geometry

OP = "SpatialConv"
PATCH_SIZES = (2, 3, 4)

__all__ = [
    "OP",
    "PATCH_SIZES",
    "diagonal_mask",
    "expand_mask",
    "make_node",
    "mask_form",
    "per_patch_mask",
    "reference",
    "uniform_filter_mask",
    "uniform_layer_mask",
    "validate_mask",
]


# ----------------------------------------------------------------------------------------------- masks
def _check_patch(patch: int) -> int:
    if int(patch) not in PATCH_SIZES:
        raise ValueError(f"{OP}: patch is {patch}, expected 2, 3 or 4")
    return int(patch)


def uniform_layer_mask(p: int, positions: Iterable[tuple[int, int]]) -> np.ndarray:
    """(p, p) mask, one pattern for the whole layer, with 1s at `positions` [(row, col), ...]."""
    p = _check_patch(p)
    m = np.zeros((p, p), np.uint8)
    for r, c in positions:
        if not (0 <= r < p and 0 <= c < p):
            raise ValueError(f"{OP}: mask position ({r}, {c}) outside the {p}x{p} patch")
        m[r, c] = 1
    return m


def diagonal_mask(p: int) -> np.ndarray:
    """The paper's baseline (Shomron et al.): the patch diagonal is computed first."""
    return uniform_layer_mask(p, [(i, i) for i in range(_check_patch(p))])


def uniform_filter_mask(patterns: Sequence[np.ndarray | Iterable[tuple[int, int]]], p: int | None = None) -> np.ndarray:
    """(K, p, p) mask, one pattern per output channel.

    patterns: K items, each a (p, p) 0/1 array or a list of (row, col) positions (then p is required).
    """
    out = []
    for pat in patterns:
        if isinstance(pat, np.ndarray):
            a = np.asarray(pat)
            if a.ndim != 2 or a.shape[0] != a.shape[1]:
                raise ValueError(f"{OP}: a per-filter pattern has shape {a.shape}, expected (p, p)")
            out.append(a.astype(np.uint8))
        else:
            if p is None:
                raise ValueError(f"{OP}: p is required when patterns are position lists")
            out.append(uniform_layer_mask(p, pat))
    m = np.stack(out)
    _check_patch(m.shape[1])
    return m


def per_patch_mask(patterns: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Full (K, OH, OW) mask from per-patch patterns of shape (K, PH, PW, p, p), PH = ceil(OH/p), PW = ceil(OW/p).

    Pattern entries that fall outside the output (margin patches) are dropped.
    """
    pats = np.asarray(patterns)
    if pats.ndim != 5 or pats.shape[3] != pats.shape[4]:
        raise ValueError(f"{OP}: per-patch patterns have shape {pats.shape}, expected (K, PH, PW, p, p)")
    K, PH, PW, p, _ = pats.shape
    _check_patch(p)
    OH, OW = out_hw
    if PH != -(-OH // p) or PW != -(-OW // p):
        raise ValueError(f"{OP}: per-patch patterns have a {PH}x{PW} patch grid, expected "
                         f"{-(-OH // p)}x{-(-OW // p)} for a {OH}x{OW} output and p={p}")
    full = pats.transpose(0, 1, 3, 2, 4).reshape(K, PH * p, PW * p)
    return np.ascontiguousarray(full[:, :OH, :OW]).astype(np.uint8)


def mask_form(mask_shape: Sequence[int], K: int, OH: int, OW: int, patch: int) -> str:
    """'layer', 'filter' or 'full' for a mask shape; ValueError naming the expected shapes otherwise.

    (K, p, p) and (K, OH, OW) coincide when OH = OW = p: the output is one patch, and both mean the same.
    """
    p = _check_patch(patch)
    shape = tuple(int(d) for d in mask_shape)
    if shape == (p, p):
        return "layer"
    if shape == (K, p, p):
        return "filter"
    if shape == (K, OH, OW):
        return "full"
    raise ValueError(f"{OP}: input 'mask' has shape {shape}, expected (p, p)=({p}, {p}), "
                     f"(K, p, p)=({K}, {p}, {p}) or (K, OH, OW)=({K}, {OH}, {OW})")


def validate_mask(mask: np.ndarray, K: int, OH: int, OW: int, patch: int) -> str:
    """Check dtype (uint8), shape and values (0/1) the way the kernel does; returns the mask form."""
    m = np.asarray(mask)
    if m.dtype != np.uint8:
        raise ValueError(f"{OP}: input 'mask' has dtype {m.dtype}, expected uint8")
    form = mask_form(m.shape, K, OH, OW, patch)
    bad = np.flatnonzero(m > 1)
    if bad.size:
        raise ValueError(f"{OP}: input 'mask' has value {int(m.flat[bad[0]])} at flat index {int(bad[0])}, "
                         f"expected 0 or 1")
    return form


def expand_mask(mask: np.ndarray, K: int, OH: int, OW: int, patch: int) -> np.ndarray:
    """Any mask form -> the full (K, OH, OW) uint8 mask it stands for."""
    p = _check_patch(patch)
    m = np.asarray(mask).astype(np.uint8)
    form = mask_form(m.shape, K, OH, OW, p)
    if form == "full":
        return m.copy()
    if form == "layer":
        m = np.broadcast_to(m, (K, p, p))
    PH, PW = -(-OH // p), -(-OW // p)
    return np.ascontiguousarray(np.tile(m, (1, PH, PW))[:, :OH, :OW])


# ------------------------------------------------------------------------------------------ reference
def _conv_preact(x, w, b, g) -> np.ndarray:
    """(N, K, OH, OW) pre-activations incl. bias, float64: conv_relu.conv2d, the one numpy convolution."""
    return conv2d(np.asarray(x, np.float64), w, b, strides=g.strides, pads=g.pads, dilations=g.dilations,
                  group=g.group)


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, mask: np.ndarray, *, patch: int,
              kernel_shape: Sequence[int] | None = None, strides: Sequence[int] = (1, 1),
              pads: Sequence[int] = (0, 0, 0, 0), dilations: Sequence[int] = (1, 1), group: int = 1,
              auto_pad: str = "NOTSET", return_preact: bool = False, other: np.ndarray | None = None):
    """Numpy reference of SpatialConv: returns (y float32 (N, K, OH, OW), macs int).

    other: the optional residual (N, K, OH, OW); the pre-activations are then conv + B + other.

    With return_preact=True also returns the float64 pre-activations (tests use them to skip
    decisions that float32 rounding could flip).
    """
    p = _check_patch(patch)
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    if kernel_shape is not None and tuple(kernel_shape) != tuple(w.shape[2:]):
        raise ValueError(f"{OP}: kernel_shape {tuple(kernel_shape)} does not match W {w.shape}")
    g = conv_geometry(x.shape, w.shape, strides=tuple(strides), pads=tuple(pads), dilations=tuple(dilations),
                      group=group, auto_pad=auto_pad)
    N, K, OH, OW = x.shape[0], g.K, g.OH, g.OW
    validate_mask(np.asarray(mask), K, OH, OW, p)
    full = expand_mask(mask, K, OH, OW, p).astype(bool)
    z = _conv_preact(x, w, b, g)
    if other is not None:
        o = np.asarray(other)
        if o.shape != (N, K, OH, OW):
            raise ValueError(f"{OP}: input 'other' has shape {o.shape}, expected (N, K, OH, OW)=({N}, {K}, {OH}, {OW})")
        z = z + o.astype(np.float64)
    y = np.where(z < 0, 0.0, z)  # ReLU that keeps NaN, like onnxruntime's

    PH, PW = -(-OH // p), -(-OW // p)
    HP, WP = PH * p, PW * p

    def patches(a):  # (..., OH, OW) -> (..., PH, PW, p, p), zero-padded margins
        lead = a.shape[:-2]
        a = np.pad(a, [(0, 0)] * len(lead) + [(0, HP - OH), (0, WP - OW)])
        return a.reshape(*lead, PH, p, PW, p).swapaxes(-3, -2)

    valid = patches(np.ones((OH, OW), bool))              # (PH, PW, p, p)
    sel = patches(full) & valid                            # (K, PH, PW, p, p)
    nsel = sel.sum(axis=(-1, -2))                          # (K, PH, PW)
    nvalid = valid.sum(axis=(-1, -2))                      # (PH, PW)
    yp = patches(y)                                        # (N, K, PH, PW, p, p)
    alive = ((yp > 0) & sel[None]).any(axis=(-1, -2))      # (N, K, PH, PW)
    whole = alive | (nsel == 0)[None]                      # patch computed in full
    macs_elems = np.where(whole, nvalid[None, None], nsel[None]).sum()
    # masked positions are computed whatever the decision (<= 0 there is 0 after ReLU, NaN stays NaN)
    out = np.where(whole[..., None, None] | sel[None], yp, 0.0)
    out = out.swapaxes(-3, -2).reshape(N, K, HP, WP)[:, :, :OH, :OW]
    macs = int(macs_elems) * (g.C // g.group) * g.KH * g.KW
    out = out.astype(np.float32)
    return (out, macs, z) if return_preact else (out, macs)


# ---------------------------------------------------------------------------------------------- node
def make_node(x: str, w_name: str, b_name: str | None, y: str, *, patch: int,
              mask: np.ndarray | None = None, mask_name: str | None = None, macs_output: str | None = None,
              kernel_shape: Sequence[int] | None = None, strides: Sequence[int] | None = None,
              pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None, group: int = 1,
              auto_pad: str = "NOTSET", name: str | None = None,
              other: str | None = None, x_blocked: bool = False, other_blocked: bool = False,
              y_blocked: bool = False) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """A SpatialConv node replacing Conv(+B)(+Add other)+Relu, and the initializers it needs.

    other: name of the residual tensor (N, K, OH, OW) of a Conv -> Add -> Relu site, or None.
    x_blocked / other_blocked / y_blocked: those tensors in the blocked layout (N, C/B, H, W, B) that
    ConvRelu and LazyConv read and write (onnxzero.ops.conv_relu.blocked_io is the rule), so a
    SpatialConv can sit inside a blocked chain of onnxzero ops.

    mask given: stored as a constant initializer (named mask_name, default f"{y}_spatial_mask").
    mask None:  mask_name is a runtime input (graph input or another node's output) fed per run.
    """
    p = _check_patch(patch)
    inits: dict[str, np.ndarray] = {}
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.uint8:
            raise ValueError(f"{OP}: mask has dtype {m.dtype}, expected uint8")
        if m.ndim not in (2, 3) or m.shape[-1] < 1 or (m.ndim == 2 and m.shape != (p, p)):
            raise ValueError(f"{OP}: mask has shape {m.shape}, expected (p, p), (K, p, p) or (K, OH, OW)")
        if (m > 1).any():
            raise ValueError(f"{OP}: mask has values other than 0 and 1")
        mask_name = mask_name or f"{y}_spatial_mask"
        inits[mask_name] = m
    elif not mask_name:
        raise ValueError(f"{OP}: give either a constant mask or the name of a runtime mask input")
    attrs: dict = {"patch": p, "group": int(group)}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    if kernel_shape is not None:
        attrs["kernel_shape"] = [int(v) for v in kernel_shape]
    if strides is not None:
        attrs["strides"] = [int(v) for v in strides]
    if pads is not None and auto_pad == "NOTSET":
        attrs["pads"] = [int(v) for v in pads]
    if dilations is not None:
        attrs["dilations"] = [int(v) for v in dilations]
    outputs = [y] + ([macs_output] if macs_output else [])
    node = OPS[OP].node({"X": x, "W": w_name, "B": b_name, "mask": mask_name, "other": other}, outputs,
                        name=name or f"{y}_spatial", **attrs, **layout_attributes(x_blocked, other_blocked, y_blocked))
    return node, inits
