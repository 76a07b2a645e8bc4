"""The bundled model zoo: real models trained on real MNIST digits.

The .onnx files and the held-out data set ship inside the package so the
demo needs no training and no network; `onnxzero zoo build` regenerates them
(see build.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnxzero.errors import UserError

ZOO_DIR = Path(__file__).parent
PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "model" or "data"
    filename: str
    description: str
    data: str | None = None  # for a model: the name of its evaluation data set

    @property
    def path(self) -> Path:
        return ZOO_DIR / self.filename


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("lenet5", "model", "models/lenet5.onnx",
                 "LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, fc120, fc84, fc10)", data="mnist"),
        ZooEntry("alexnet-mnist", "model", "models/alexnet-mnist.onnx",
                 "AlexNet pattern: five conv+ReLU, three max pools, two hidden fc", data="mnist"),
        ZooEntry("resnet-mnist", "model", "models/resnet-mnist.onnx",
                 "small ResNet: BatchNorm, residual adds, stride-2 stages", data="mnist"),
        ZooEntry("resnet18-mnist", "model", "models/resnet18-mnist.onnx",
                 "ResNet-18 (BasicBlock x [2,2,2,2], 64..512 wide, 20 convs), 3x3 stride-1 stem, "
                 "no max pool; held-out top-1 98.2%", data="mnist"),
        ZooEntry("mnist", "data", "data/mnist-heldout.npz",
                 "1,000 held-out real MNIST digits (inputs float32 N,1,28,28; labels int64)"),
    ]
}


def entry(name: str) -> ZooEntry:
    name = name.removeprefix(PREFIX)
    if name not in ENTRIES:
        raise UserError(f"unknown zoo entry '{name}': expected one of {', '.join(ENTRIES)}")
    return ENTRIES[name]


def path(name: str) -> Path:
    """File path of a zoo model or data set (`onnxzero zoo path NAME`)."""
    e = entry(name)
    if not e.path.is_file():
        raise UserError(f"zoo file for '{e.name}' is missing at {e.path}: expected it shipped in the package")
    return e.path


def default_data(model: str) -> Path | None:
    """The zoo data set that goes with a zoo model spec, or None."""
    if not model.startswith(PREFIX):
        return None
    e = entry(model)
    return path(e.data) if e.data else None
