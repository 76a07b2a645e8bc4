"""Data sets: .npz files with `inputs` (float32, NCHW) and optional `labels` (int64).

Every command that reads data goes through load_dataset (the file, dtypes, finite values) and
check_fits (the data against the model: input shape, labels against the output), so a bad
data set is one line before any calibration, search or write, whichever command reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxzero.errors import UserError


@dataclass
class Dataset:
    inputs: np.ndarray
    labels: np.ndarray | None
    path: Path

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def load_dataset(path: str | Path) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p} (expected an .npz with 'inputs' and optional 'labels')")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{p} is not a readable .npz file ({type(e).__name__}): expected numpy's .npz format") from None
    if "inputs" not in arrays:
        raise UserError(f"{p} has no 'inputs' array: expected keys 'inputs' and optional 'labels', got {sorted(arrays)}")
    x = arrays["inputs"]
    if x.dtype != np.float32:
        raise UserError(f"{p}: 'inputs' has dtype {x.dtype}, expected float32")
    if x.ndim < 1 or x.shape[0] == 0:
        raise UserError(f"{p}: 'inputs' has shape {x.shape}, expected a non-empty batch (N, ...)")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        # NaN/Inf would poison calibration (thresholds, predictors, pruning levels) without a word
        raise UserError(f"{p}: 'inputs' has NaN or Inf in {int(bad.sum())} of {len(x)} samples (first: sample "
                        f"{int(np.argmax(bad))}), expected finite values")
    y = arrays.get("labels")
    if y is not None:
        if y.dtype.kind not in "iu":
            raise UserError(f"{p}: 'labels' has dtype {y.dtype}, expected int64")
        if y.shape != (x.shape[0],):
            raise UserError(f"{p}: 'labels' has shape {y.shape}, expected ({x.shape[0]},) to match 'inputs'")
        if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
            raise UserError(f"{p}: 'labels' has values up to {y.max()}, expected class indices")
        y = y.astype(np.int64)
    return Dataset(inputs=x, labels=y, path=p)


def image_input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """(name, dims) of the model's one float image input; dims None where not fixed."""
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise UserError(f"model has {len(inputs)} graph inputs, expected exactly 1 image input to feed data to")
    t = inputs[0].type.tensor_type
    if t.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"model input '{inputs[0].name}' is {onnx.TensorProto.DataType.Name(t.elem_type)}, expected FLOAT")
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def check_fits(ds: Dataset, model: onnx.ModelProto, *, fix_size: bool = True) -> None:
    """Raise UserError unless every sample fits the model's image input and the labels fit its output.

    fix_size: input dimensions the model leaves symbolic (H, W of a fully convolutional export)
    are then fixed, in `model` itself, to the data's. The sites' shapes and MACs, and so what
    the search can measure and choose (a spatial mask is per output position), exist only at a
    concrete size, and this data is the size the model is searched and profiled at; the batch
    stays as declared.
    """
    name, dims = image_input(model)
    got = list(ds.inputs.shape)
    if len(dims) != len(got):
        raise UserError(f"{ds.path}: 'inputs' has shape {tuple(got)}, expected rank {len(dims)} for model input "
                        f"'{name}' of shape {_fmt(dims)}")
    for i, (want, have) in enumerate(zip(dims[1:], got[1:]), start=1):
        if want is not None and want != have:
            raise UserError(f"{ds.path}: 'inputs' has shape {tuple(got)}, expected {_fmt(dims)} "
                            f"(dimension {i} should be {want})")
    if ds.labels is not None:
        check_labels(ds, model)
    if not fix_size:
        return
    inp = next(i for i in model.graph.input if i.name == name)
    for d, want, have in zip(list(inp.type.tensor_type.shape.dim)[1:], dims[1:], got[1:]):
        if want is None:
            d.Clear()
            d.dim_value = have


def check_labels(ds: Dataset, model: onnx.ModelProto) -> None:
    """Labels are class indices of the model's first output, (N, classes) logits: refuse anything else."""
    out = model.graph.output[0]
    t = out.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim] \
        if t.HasField("shape") else None
    y = ds.labels
    if dims is not None and len(dims) > 2 and any(d != 1 for d in dims[2:]):
        # a per-position output (segmentation, detection maps): one class per sample does not apply
        raise UserError(f"{ds.path}: 'labels' has shape {y.shape}, but model output '{out.name}' has shape "
                        f"{_fmt(dims)}, not (N, classes): expected a data set without 'labels' for this model "
                        "(its own predictions are then the reference)")
    classes = dims[1] if dims is not None and len(dims) >= 2 else None
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (classes is not None and hi >= classes):
        want = f"0..{classes - 1} for the {classes} classes of model output '{out.name}'" if classes else \
            "class indices >= 0"
        raise UserError(f"{ds.path}: labels range {lo}..{hi}, expected {want}")


def _fmt(dims: list[int | None]) -> str:
    return "(" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + ")"
