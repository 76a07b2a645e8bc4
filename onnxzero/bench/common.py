"""Shared pieces of `onnxzero bench ops`: the layer shapes and one op's bench case.

Each op contributes a module onnxzero/bench/op_<name>.py with

    OP: str                                   # the custom op's name
    def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase

which returns a one-node model of that op on `layer` set up to skip about
`skip` of the dense MACs (0 = its no-skip setting), plus the feeds. The
framework measures the skipped fraction from the op's own `macs` output, so
the `skip` asked for is only a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx


@dataclass(frozen=True)
class Layer:
    name: str
    C: int
    K: int
    H: int
    W: int
    KH: int
    KW: int
    stride: int = 1
    pad: int = 0

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (1, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.C, self.KH, self.KW)

    def conv_attrs(self) -> dict:
        return {"strides": [self.stride] * 2, "pads": [self.pad] * 4, "kernel_shape": [self.KH, self.KW]}


# Layer shapes from real CNNs (ResNet/VGG stages, a bottleneck 1x1, ResNet's stem), then the
# ResNet-18 on 28x28 digits (small-image stem, no max pool: stages at 28, 14, 7 and 4 pixels), whose
# 0.2-0.6 ms layers are where skipping has to pay in wall-clock time.
LAYERS: list[Layer] = [
    Layer("3x3 64x56x56", 64, 64, 56, 56, 3, 3, 1, 1),
    Layer("3x3 128x28x28", 128, 128, 28, 28, 3, 3, 1, 1),
    Layer("3x3 256x14x14", 256, 256, 14, 14, 3, 3, 1, 1),
    Layer("3x3 512x7x7", 512, 512, 7, 7, 3, 3, 1, 1),
    Layer("1x1 256->64 56x56", 256, 64, 56, 56, 1, 1, 1, 0),
    Layer("7x7/2 3->64 224x224", 3, 64, 224, 224, 7, 7, 2, 3),
    Layer("3x3 1->64 28x28", 1, 64, 28, 28, 3, 3, 1, 1),
    Layer("3x3 64x28x28", 64, 64, 28, 28, 3, 3, 1, 1),
    Layer("3x3 128x14x14", 128, 128, 14, 14, 3, 3, 1, 1),
    Layer("3x3 256x7x7", 256, 256, 7, 7, 3, 3, 1, 1),
    Layer("3x3 512x4x4", 512, 512, 4, 4, 3, 3, 1, 1),
]
_BY_NAME = {layer.name: layer for layer in LAYERS}

# The ResNet-18/MNIST shapes (issue 10): its stem, its four stages, and 64@56x56.
RESNET18_MNIST: list[str] = ["3x3 1->64 28x28", "3x3 64x28x28", "3x3 128x14x14", "3x3 256x7x7", "3x3 512x4x4",
                             "3x3 64x56x56"]


def chain_for(layer: Layer) -> list[Layer] | None:
    """The three-conv chain a layer is measured in (in-context numbers), or None.

    The ResNet-18/MNIST shapes have one (the other bench layers are measured alone, which keeps the
    default bench short). A shape-preserving layer (C = K, stride 1, 'same' padding) is chained with
    itself: op -> op -> op. The 1-channel stem cannot follow itself; it is chained the way
    ResNet-18/MNIST starts: stem -> 64@28x28 -> 64@28x28.
    """
    if layer.name not in RESNET18_MNIST:
        return None
    same = layer.C == layer.K and layer.stride == 1 and 2 * layer.pad == layer.KH - 1 and layer.KH == layer.KW
    if same:
        return [layer] * 3
    if layer.name == "3x3 1->64 28x28":
        return [layer, _BY_NAME["3x3 64x28x28"], _BY_NAME["3x3 64x28x28"]]
    return None

SKIPS = [0.0, 0.25, 0.5, 0.75, 0.9]  # what `--skip` may ask for: every op module supports these
# The default run: the skips the targets are set at (ops.TARGETS), so the whole bench stays ~3 minutes.
DEFAULT_SKIPS = [0.0, 0.5, 0.9]


def realistic_input(layer: Layer, rng: np.random.Generator, *, nonneg: bool = True) -> np.ndarray:
    """Post-ReLU-like activations (half zeros) unless nonneg is False."""
    x = rng.standard_normal(layer.x_shape).astype(np.float32)
    return np.maximum(x, 0) if nonneg else x


def he_weights(layer: Layer, rng: np.random.Generator) -> np.ndarray:
    fan_in = layer.C * layer.KH * layer.KW
    return (rng.standard_normal(layer.w_shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


@dataclass
class BenchCase:
    model: onnx.ModelProto           # one node of the op; graph output 'macs' holds the counter
    feeds: dict[str, np.ndarray]
    setting: str = ""                # what was set to reach the skip target (for the table)
    extra: dict = field(default_factory=dict)
