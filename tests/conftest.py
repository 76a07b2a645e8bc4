"""Shared fixtures: the onnx wheel's light models with He-normal weights, torch-exported CNNs.

- `light_model(name)`: a light model whose ConstantOfShape weights are replaced by
  deterministic He-normal initializers (and plausible BatchNorm statistics), so that
  activations look like a trained CNN's instead of the constant 0.02 everywhere.
- `torch_cnn`: a small torch CNN covering stride 2, dilation, asymmetric padding
  (ZeroPad2d -> Pad), grouped and depthwise convs, BatchNorm after a conv, a per-channel
  Mul/Add after a conv, ReLU6 (Clip(0, 6)), a residual add and concat branches.
- `torch_exports` / `torch_export_paths`: `torch_cnn` exported by the TorchScript exporter
  (with and without its own constant folding) and by the dynamo exporter (with and
  without its optimizer, saved with external data), loaded by onnxzero.load.load_model.
- `ort_run(model, feeds)`: run a model in plain onnxruntime with graph optimizations off,
  so comparisons test our graph and not onnxruntime's fusions; `random_feeds(model)`.
"""

from __future__ import annotations

import os

# numpy.linalg (the lazy predictor fit) on a multi-threaded OpenBLAS oversubscribes a loaded 2-core
# machine: one resnet18 fit took 27 min instead of 1. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                "shufflenet", "squeezenet", "vgg19", "zfnet512")


def _weight_roles(model: onnx.ModelProto) -> dict[str, tuple[str, int, onnx.NodeProto | None, str]]:
    """tensor -> (op type, input index, node, op after that node) of its first user.

    Looks through the Unsqueeze/Reshape that some light models put between a weight and
    its Mul/Add.
    """
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            users.setdefault(inp, []).append((node, i))

    def role(name: str):
        while users.get(name):
            node, i = users[name][0]
            if node.op_type not in ("Unsqueeze", "Reshape", "Identity", "Squeeze") or i != 0:
                after = users.get(node.output[0], [(None, 0)])[0][0]
                return node.op_type, i, node, after.op_type if after is not None else ""
            name = node.output[0]
        return "", -1, None, ""

    return {out: role(out) for node in model.graph.node for out in node.output}


def _plausible_tensor(rng: np.random.Generator, shape: tuple[int, ...], role) -> np.ndarray:
    op, idx, node, after = role

    def normal(std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def uniform(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, shape).astype(np.float32)

    if op == "Conv" and idx == 1:  # He-normal: std sqrt(2 / fan_in), fan_in = C/group * KH * KW
        return normal(np.sqrt(2.0 / np.prod(shape[1:])))
    if op == "Gemm" and idx == 1:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        fan_in = shape[-1] if trans_b else shape[-2]  # some light models give the 2-D weight as (1, 1, out, in)
        # He's gain 2 makes up for a ReLU after the layer; the classifier has none.
        return normal(np.sqrt((1.0 if after == "Softmax" else 2.0) / fan_in))
    if op == "BatchNormalization":  # scale, bias, mean, var
        if idx == 1:
            # A BN that ends a residual branch gets a small scale, as trained ResNets have
            # (and as zero-init-residual training starts from); with unit scales the residual
            # sums double the activations every block and the softmax saturates.
            return uniform(0.8, 1.2) * np.float32(0.3 if after in ("Sum", "Add") else 1.0)
        return {2: lambda: normal(0.1), 3: lambda: normal(0.1), 4: lambda: uniform(0.5, 1.5)}[idx]()
    if op == "Mul":  # a scale
        return uniform(0.8, 1.2)
    return normal(0.05)  # biases and shifts


def he_normal_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model `name` with each ConstantOfShape-produced tensor a random initializer.

    The model stays as the wheel ships it otherwise (opset 9, IR 3: the new initializers
    are listed as graph inputs too, as IR 3 requires), so it still exercises normalize.
    """
    model = onnx.load(LIGHT_DIR / f"light_{name}.onnx")
    graph = model.graph
    rng = np.random.default_rng(seed)
    roles = _weight_roles(model)
    inits = {t.name: t for t in graph.initializer}
    made: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            made[node.input[0]] = node.output[0], _plausible_tensor(rng, shape, roles[node.output[0]])
    # Edit in place rather than rebuild: the protobuf copies of VGG19's 0.5 GB take seconds.
    for field, key in ((graph.node, lambda n: n.op_type == "ConstantOfShape" and n.input[0] in made),
                       (graph.initializer, lambda t: t.name in made), (graph.input, lambda i: i.name in made)):
        for i in reversed([i for i, x in enumerate(field) if key(x)]):
            del field[i]
    for name, value in made.values():
        t = graph.initializer.add()
        t.name, t.data_type, t.raw_data = name, onnx.TensorProto.FLOAT, value.tobytes()
        t.dims.extend(value.shape)
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape)))
    return model


@functools.cache
def _light_model_cached(name: str) -> onnx.ModelProto:
    return he_normal_light_model(name)


@pytest.fixture(scope="session")
def light_model():
    """light_model(name) -> a fresh copy of the He-normal light model `name` (see LIGHT_MODELS)."""

    def get(name: str) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(_light_model_cached(name))
        return copy

    return get


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (not initializers listed as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _random_feeds(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """N(0, 1) float32 inputs; symbolic dims (the batch) become `batch`."""
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value if d.HasField("dim_value") else batch
                                         for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in _data_inputs(model)}


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    # Large weights are fed as run-time inputs instead of serialized into the session: on a
    # small CI machine serializing and parsing VGG19's 0.5 GB takes ~10 s per session, and
    # with graph optimizations off onnxruntime runs the same kernels either way.
    m = ir.serde.deserialize_model(model)
    weights = {}
    for name, v in list(m.graph.initializers.items()):
        if v.const_value is not None and v.const_value.nbytes > (1 << 20):
            weights[name] = v.const_value.numpy()
            v.shape, v.dtype = v.const_value.shape, v.const_value.dtype
            m.graph.initializers.pop(name)
            if v not in m.graph.inputs:
                m.graph.inputs.append(v)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # IR-3 models warn about every initializer listed as an input
    sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run([o.name for o in model.graph.output], {**feeds, **weights})


@pytest.fixture(scope="session")
def ort_run():
    """ort_run(model, feeds) -> outputs, onnxruntime graph optimizations off."""
    return _ort_run


@pytest.fixture(scope="session")
def random_feeds():
    """random_feeds(model, batch=1, seed=0) -> {input name: N(0, 1) float32 array} for the run-time inputs."""
    return _random_feeds


# --- torch models -------------------------------------------------------------------------


def _torch_cnn():
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        """Every Conv shape the rewrite must handle; comments name the feature each line covers."""

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # stride 2, BN after conv
            self.bn1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2)  # dilation
            self.pad = nn.ZeroPad2d((1, 2, 0, 1))  # asymmetric padding -> Pad node
            self.c3 = nn.Conv2d(16, 16, 3)  # then ReLU6 -> Clip(0, 6)
            self.c4 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)  # grouped, no bias, BN
            self.bn4 = nn.BatchNorm2d(16)
            self.c5 = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise, per-channel Mul/Add
            self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
            self.shift = nn.Parameter(torch.randn(16, 1, 1) * 0.1)
            self.b1 = nn.Conv2d(16, 8, 1)  # concat branch 1
            self.b2 = nn.Conv2d(16, 8, 3, padding=1)  # concat branch 2
            self.c6 = nn.Conv2d(32, 8, 1)  # head: no ReLU after it

        def forward(self, x):
            x = torch.relu(self.bn1(self.c1(x)))
            x = torch.relu(self.c2(x))
            x = nn.functional.relu6(self.c3(self.pad(x)))
            y = torch.relu(self.bn4(self.c4(x)))
            y = torch.relu(self.c5(y) * self.scale + self.shift)
            x = x + y  # residual add
            x = torch.cat([torch.relu(self.b1(x)), torch.relu(self.b2(x)), nn.functional.max_pool2d(x, 3, 1, 1)], 1)
            return self.c6(x)

    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn4):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model


#: TinyCNN's input, per sample; the exports keep the batch dimension symbolic.
TORCH_INPUT_SHAPE = (3, 32, 32)


@pytest.fixture(scope="session")
def torch_cnn():
    return _torch_cnn()


@pytest.fixture(scope="session")
def torch_export_paths(torch_cnn, tmp_path_factory) -> dict[str, Path]:
    """TinyCNN exported four ways: name -> .onnx path (each in its own folder).

    torchscript (opset 17, the exporter's own constant folding, which already folds BN);
    torchscript_nofold (do_constant_folding=False, opset 11: BatchNormalization and Pad
    stay for normalize to fold, and the opset needs converting); dynamo (the default, its
    optimizer on); dynamo_noopt (optimize=False: BN, Pad, CastLike bounds stay). Both
    dynamo exports are saved with external data (model.onnx + model.onnx.data).
    """
    import torch

    out_dir = tmp_path_factory.mktemp("torch_exports")
    x = torch.randn(2, *TORCH_INPUT_SHAPE)
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in (("torchscript", dict(opset_version=17)),
                             ("torchscript_nofold", dict(opset_version=11, do_constant_folding=False))):
            path = out_dir / name / "model.onnx"
            path.parent.mkdir()
            torch.onnx.export(torch_cnn, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, **kwargs)
            paths[name] = path
        # One dynamo export, saved before and after ONNXProgram.optimize() (what
        # optimize=True runs), because each export costs seconds.
        program = torch.onnx.export(torch_cnn, (x,), dynamo=True, optimize=False, verbose=False,
                                    input_names=["x"], output_names=["y"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("N")}})
        for name in ("dynamo_noopt", "dynamo"):
            if name == "dynamo":
                program.optimize()
            path = out_dir / name / "model.onnx"
            path.parent.mkdir()
            program.save(str(path), external_data=True)
            paths[name] = path
    return paths


TORCH_EXPORTS = ("torchscript", "torchscript_nofold", "dynamo", "dynamo_noopt")


@pytest.fixture(scope="session")
def torch_exports(torch_export_paths) -> dict[str, onnx.ModelProto]:
    """The torch_export_paths models, loaded (external data too) by onnxzero.load.load_model."""
    from onnxzero.load import load_model

    return {name: load_model(path) for name, path in torch_export_paths.items()}


@pytest.fixture(scope="session")
def torch_reference(torch_cnn):
    """reference(x: np.ndarray) -> TinyCNN's output computed by torch."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch_cnn(torch.from_numpy(x)).numpy()

    return run


@pytest.fixture(params=LIGHT_MODELS)
def light_name(request) -> str:
    """Parametrizes a test over the nine light model names."""
    return request.param


@pytest.fixture(params=TORCH_EXPORTS)
def torch_export_name(request) -> str:
    """Parametrizes a test over the four TinyCNN exports."""
    return request.param


# --- hypothesis strategies shared by the tests ---------------------------------------------
# Import them with `from conftest import conv_geometries, activations, he_weights` (pytest puts
# tests/ on sys.path). They draw what real CNNs have: convs of every stride / padding / dilation /
# group, ReLU outputs with many exact zeros, He-normal weights.

from hypothesis import strategies as st  # noqa: E402


@st.composite
def conv_geometries(draw, *, max_channels: int = 8, max_hw: int = 12, max_kernel: int = 3,
                    max_batch: int = 2) -> dict:
    """A valid 2-D Conv: dict(n, c, h, w, k, kh, kw, strides, pads (top, left, bottom, right),
    dilations, group), with an output of at least 1 x 1.

    The output size is not returned on purpose: a test takes it from onnxruntime's result rather
    than from the formula the code under test uses.
    """
    group = draw(st.sampled_from([1, 1, 2, 4]))
    c = group * draw(st.integers(1, max(1, max_channels // group)))
    k = group * draw(st.integers(1, max(1, max_channels // group)))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    # the input must hold the dilated kernel once the padding is added
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - pads[0] - pads[2]), max_hw))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - pads[1] - pads[3]), max_hw))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return dict(n=draw(st.integers(1, max_batch)), c=c, h=h, w=w, k=k, kh=kh, kw=kw, strides=strides,
                pads=pads, dilations=(dh, dw), group=group)


@st.composite
def activations(draw, shape: tuple[int, ...], *, nonneg: bool = False) -> np.ndarray:
    """float32 N(0, 1) values of `shape` of which a drawn fraction (0 to 90 %, or all) is exactly 0,
    as ReLU outputs are; `nonneg` folds the rest to >= 0."""
    zero = draw(st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zero] = 0.0
    return np.abs(x) if nonneg else x


def he_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """He-normal conv weights (K, C/group, KH, KW): std sqrt(2 / fan_in), as a trained ReLU CNN starts."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)


def run_concurrently(items, check) -> None:
    """check(item) for every item, each in its own thread, all at once (a Barrier lines them up): the
    kernels must hold up when one session runs concurrently. Re-raises the first failure."""
    import threading

    items = list(items)
    errors: list[BaseException] = []
    start = threading.Barrier(len(items))

    def worker(item):
        try:
            start.wait()
            check(item)
        except BaseException as e:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def default_sigint() -> None:
    """Popen(preexec_fn=...): the child takes Ctrl-C as a terminal user's process does. A shell runs a
    background job with SIGINT ignored, and a child inherits that, so without this a CI runner started
    in the background would see the Ctrl-C tests' SIGINT do nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
