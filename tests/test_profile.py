"""Tests for onnxzero.profile: exact MACs and params, exact zero rates, JSON, plots, real model-zoo CNNs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxzero.errors import UserError
from onnxzero.profile import ProfileReport, profile_model
from onnxzero.profile.api import latency_stats, time_shares
from onnxzero.profile.runtime import parse_profile

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.name for p in LIGHT_DIR.glob("light_*.onnx"))
ZOO_LENET = Path(__file__).resolve().parents[1] / "onnxzero" / "zoo" / "models" / "lenet5.onnx"


# --------------------------------------------------------------------------- helpers
def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int | None = None) -> TensorProto:
    scale = math.sqrt(2.0 / fan_in) if fan_in else 0.1
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _scalar(name: str, v: float) -> TensorProto:
    return numpy_helper.from_array(np.array(v, np.float32), name)


def lenet_like(batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """A LeNet-like CNN with a depthwise conv + Clip(0, 6), a grouped conv, Gemm and MatMul.

    28x28 -> conv1 6@5x5 (24x24) -> ReLU -> pool (12x12) -> depthwise 3x3 pad 1 -> Clip(0,6)
    -> conv2 16@5x5 (8x8) -> ReLU -> pool (4x4) -> grouped conv (2 groups) 8@3x3 pad 1 -> ReLU
    -> Flatten (128) -> Gemm 64 -> ReLU -> MatMul 10 -> Add bias.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w1", (6, 1, 5, 5), 25), _init(rng, "b1", (6,)),
        _init(rng, "wdw", (6, 1, 3, 3), 9), _init(rng, "bdw", (6,)), _scalar("zero", 0.0), _scalar("six", 6.0),
        _init(rng, "w2", (16, 6, 5, 5), 150), _init(rng, "b2", (16,)),
        _init(rng, "wg", (8, 8, 3, 3), 72), _init(rng, "bg", (8,)),
        _init(rng, "wfc", (64, 128), 128), _init(rng, "bfc", (64,)),
        _init(rng, "wmm", (64, 10), 64), _init(rng, "bmm", (10,)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "wdw", "bdw"], ["dw"], name="dwconv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=6),
        helper.make_node("Clip", ["dw", "zero", "six"], ["dwa"], name="relu6"),
        helper.make_node("Conv", ["dwa", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "wg", "bg"], ["g"], name="gconv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=2),
        helper.make_node("Relu", ["g"], ["rg"], name="relu_g"),
        helper.make_node("Flatten", ["rg"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["rh"], name="relu_fc"),
        helper.make_node("MatMul", ["rh", "wmm"], ["mm"], name="fc2"),
        helper.make_node("Add", ["mm", "bmm"], ["logits"], name="bias2"),
    ]
    graph = helper.make_graph(nodes, "lenet_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


# per-sample MACs by the paper's formulas: out_H*out_W*K_h*K_w*(C_in/group)*C_out, and in*out for fc
LENET_MACS = {
    "conv1": 24 * 24 * 5 * 5 * 1 * 6,  # 86,400 (the paper's conv1)
    "dwconv": 12 * 12 * 3 * 3 * (6 // 6) * 6,  # depthwise: 7,776
    "conv2": 8 * 8 * 5 * 5 * 6 * 16,  # 153,600
    "gconv": 4 * 4 * 3 * 3 * (16 // 2) * 8,  # 2 groups: 9,216
    "fc1": 128 * 64,  # Gemm: 8,192
    "fc2": 64 * 10,  # MatMul: 640
}
LENET_PARAMS = {"conv1": 150 + 6, "dwconv": 54 + 6, "conv2": 2400 + 16, "gconv": 576 + 8, "fc1": 8192 + 64,
                "fc2": 640, "bias2": 10, "relu6": 0}  # Clip's scalar bounds are not parameters
LENET_ACTS = {"relu1": "r1", "relu6": "dwa", "relu2": "r2", "relu_g": "rg", "relu_fc": "rh"}
LABEL_SET = np.array([0, 1, 2, 5, 7])  # not 0..K-1 on purpose


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _npz(path: Path, inputs: np.ndarray, labels: np.ndarray | None = None) -> Path:
    arrays = {"inputs": inputs} if labels is None else {"inputs": inputs, "labels": labels}
    np.savez(path, **arrays)
    return path


def _intermediates(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Independent of the package: expose `names` as outputs and run the whole batch in onnxruntime."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {m.graph.input[0].name: x}), strict=True))


@pytest.fixture(scope="module")
def lenet_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("lenet")
    model = lenet_like()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((250, 1, 28, 28)).astype(np.float32)  # 3 chunks of the data pass: 100, 100, 50
    y = LABEL_SET[rng.integers(0, len(LABEL_SET), 250)].astype(np.int64)
    mpath = _save(model, d / "lenet_like.onnx")
    dpath = _npz(d / "data.npz", x, y)
    report = profile_model(mpath, data=dpath, runs=2)
    return model, x, y, report, d


# --------------------------------------------------------------------------- costs
def test_macs_match_the_formulas(lenet_case):
    report = lenet_case[3]
    macs = {n.name: n.macs for n in report.nodes}
    for name, want in LENET_MACS.items():
        assert macs[name] == want, name
    assert macs["conv1"] == 86_400 and macs["conv2"] == 153_600
    for name in ("relu1", "pool1", "relu6", "relu2", "pool2", "relu_g", "flatten", "relu_fc", "bias2"):
        assert macs[name] == 0, name
    assert report.model.macs == sum(LENET_MACS.values()) == 265_824


def test_params_and_shapes(lenet_case):
    report = lenet_case[3]
    params = {n.name: n.params for n in report.nodes}
    for name, want in LENET_PARAMS.items():
        assert params[name] == want, name
    assert report.model.params == sum(v for v in LENET_PARAMS.values()) == 12_122
    shapes = {n.name: n.output_shape for n in report.nodes}
    assert shapes["conv1"] == [1, 6, 24, 24]
    assert shapes["gconv"] == [1, 8, 4, 4]
    assert shapes["fc2"] == [1, 10]
    assert [n.name for n in report.nodes] == [n.name for n in lenet_case[0].graph.node]


# --------------------------------------------------------------------------- zero rates
def test_zero_rates_equal_numpy_recomputation(lenet_case):
    model, x, y, report, _ = lenet_case
    acts = {a.node: a for a in report.activations}
    assert set(acts) == set(LENET_ACTS)
    ref = _intermediates(model, list(LENET_ACTS.values()), x)
    for node, value in LENET_ACTS.items():
        a, z = acts[node], ref[value] == 0
        assert a.output == value
        assert a.zero_rate == pytest.approx(z.mean(), abs=1e-12)
        assert 0.05 < a.zero_rate < 0.95  # a real mix, so the comparison means something
        assert a.per_channel == pytest.approx(list(z.mean(axis=tuple(i for i in range(z.ndim) if i != 1))),
                                              abs=1e-12)
        assert a.per_class is not None and sorted(a.per_class) == LABEL_SET.tolist()
        for c in LABEL_SET:
            assert a.per_class[int(c)] == pytest.approx(z[y == c].mean(), abs=1e-12), (node, c)
            row = a.per_class_channel[list(LABEL_SET).index(c)]
            want = z[y == c].reshape(int((y == c).sum()), z.shape[1], -1).mean(axis=(0, 2))
            assert row == pytest.approx(want, abs=1e-12)


def test_accuracy_is_top1_over_the_data(lenet_case):
    model, x, y, report, _ = lenet_case
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"x": x})
    assert report.model.accuracy == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert report.model.samples == 250


def test_sites_and_savings(lenet_case):
    report = lenet_case[3]
    sites = {s.node: s for s in report.sites}
    assert [(s.node, s.relu) for s in report.sites] == [("conv1", "relu1"), ("dwconv", "relu6"),
                                                        ("conv2", "relu2"), ("gconv", "relu_g")]
    nodes = {n.name: n for n in report.nodes}
    acts = {a.node: a for a in report.activations}
    for s in sites.values():
        assert s.macs == LENET_MACS[s.node]
        assert s.zero_rate == acts[s.relu].zero_rate
        assert s.macs_zero == pytest.approx(s.macs * s.zero_rate)
        assert s.time_share == pytest.approx(nodes[s.node].time_share + nodes[s.relu].time_share)
        assert s.est_time_saved == pytest.approx(s.time_share * s.zero_rate)


def test_timings_are_sane(lenet_case):
    report = lenet_case[3]
    m = report.model
    assert m.latency_median_ms > 0
    assert m.latency_batch_size == 1 and m.latency_runs == 2
    assert all(n.latency_ms > 0 for n in report.nodes if n.op_type == "Conv")


def test_time_shares_and_latency_stats_by_hand():
    assert time_shares({"conv": 3.0, "relu": 1.0, "pool": 0.0}) == {"conv": 0.75, "relu": 0.25, "pool": 0.0}
    assert time_shares({"conv": 0.0}) == {"conv": 0.0}  # nothing timed: no division by zero
    # median of 5 runs is the 3rd; the 90th percentile sits 0.6 of the way from the 4th (4) to the 5th (10)
    assert latency_stats([10.0, 2.0, 4.0, 1.0, 3.0]) == (3.0, pytest.approx(7.6))
    assert latency_stats([2.0, 1.0]) == (1.5, pytest.approx(1.9))


def test_parse_profile_skips_the_warmup_run_and_averages():
    ev = [{"cat": "Session", "name": "model_run", "ts": t, "dur": 90} for t in (0, 100, 200, 300)]
    ev += [{"cat": "Node", "name": "conv1_kernel_time", "ts": t + 1, "dur": d,
            "args": {"output_type_shape": [{"float": [1, 6, 24, 24]}]}}
           for t, d in ((0, 999), (100, 10), (200, 30), (300, 80))]
    ev += [{"cat": "Node", "name": "conv1_fence_before", "ts": 105, "dur": 5000}]
    times = parse_profile(ev)
    assert times.runs == 3
    assert times.latency_ms == {"conv1": pytest.approx(0.040)}  # (10 + 30 + 80) us / 3, warmup's 999 left out
    assert times.median_ms == {"conv1": pytest.approx(0.030)}
    assert times.output_shapes == {"conv1": [(1, 6, 24, 24)]}


# --------------------------------------------------------------------------- outputs
def test_json_has_the_required_keys_and_serializes(lenet_case):
    report = lenet_case[3]
    j = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert {"params", "macs", "latency_ms", "accuracy"} <= set(j["model"])
    assert {"median", "p90"} <= set(j["model"]["latency_ms"]) and j["model"]["latency_ms"]["batch_size"] == 1
    assert isinstance(j["model"]["accuracy"], float)
    node_keys = {"name", "op_type", "params", "macs", "latency_ms", "time_share", "output_shape"}
    assert all(node_keys <= set(n) for n in j["nodes"]) and len(j["nodes"]) == 15
    assert all({"node", "zero_rate", "per_channel", "per_class"} <= set(a) for a in j["activations"])
    assert set(j["activations"][0]["per_class"]) == {str(c) for c in LABEL_SET}
    site_keys = {"node", "relu", "macs", "zero_rate", "macs_zero", "time_share", "est_time_saved"}
    assert all(site_keys <= set(s) for s in j["sites"]) and len(j["sites"]) == 4
    assert isinstance(j["notes"], list)
    assert j["model"]["macs"] == 265_824 and j["model"]["params"] == 12_122


def test_plots_are_png_files_written_atomically(lenet_case, tmp_path):
    report = lenet_case[3]
    out = tmp_path / "plots" / "nested"
    paths = report.write_plots(out)
    names = sorted(p.name for p in paths)
    assert len([n for n in names if n.startswith("zero_rate_0")]) == len(report.activations) == 5
    assert {"zero_rate_per_class.png", "zero_rate_per_layer.png", "latency_per_node.png"} <= set(names)
    for p in paths:
        assert p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary files left behind


def test_render_prints_the_tables(lenet_case):
    report = lenet_case[3]
    console = Console(record=True, width=220)
    report.render(console)
    text = console.export_text()
    for needle in ("Table I", "Per-node profile", "conv1", "86,400", "153,600", "ReLU activations", "relu6",
                   "Conv+ReLU sites", "265,824"):
        assert needle in text, needle


# --------------------------------------------------------------------------- model forms
def test_random_inputs_without_data_say_so(tmp_path):
    report = profile_model(_save(lenet_like(), tmp_path / "m.onnx"), runs=1, progress=True)
    assert report.model.data == "random" and report.model.samples == 1
    assert report.model.accuracy is None
    assert any("random" in n and "real data" in n for n in report.notes)
    assert all(a.per_class is None for a in report.activations)
    j = report.to_json()
    assert j["model"]["accuracy"] is None and j["activations"][0]["per_class"] is None
    paths = report.write_plots(tmp_path / "plots")  # bar charts instead of class heat maps
    assert "zero_rate_per_class.png" not in {p.name for p in paths} and len(paths) == 5 + 2


def test_static_batch_model_pads_the_last_batch(tmp_path, lenet_case):
    _, x, y, _, _ = lenet_case
    x, y = x[:10], y[:10]  # batches of 4: 4, 4, 2 (+2 padding that must not count)
    static = profile_model(_save(lenet_like(batch=4), tmp_path / "s.onnx"), data=_npz(tmp_path / "d.npz", x, y),
                           runs=1)
    ref = _intermediates(lenet_like(), list(LENET_ACTS.values()), x)
    for a in static.activations:
        assert a.zero_rate == pytest.approx((ref[a.output] == 0).mean(), abs=1e-12)
    assert static.model.samples == 10 and static.model.latency_batch_size == 4
    macs = {n.name: n.macs for n in static.nodes}
    assert macs["conv1"] == 86_400  # still per sample


def test_dynamic_batch_torch_export(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.c2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4)
            self.fc = torch.nn.Linear(8 * 13 * 13, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.c1(x)))
            x = torch.relu(self.c2(x))
            return self.fc(x.flatten(1))

    path = tmp_path / "torch.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(2).standard_normal((130, 1, 28, 28)).astype(np.float32)
    y = np.arange(130, dtype=np.int64) % 10
    report = profile_model(path, data=_npz(tmp_path / "d.npz", x, y), runs=1)
    convs = [n for n in report.nodes if n.op_type == "Conv"]
    assert [c.macs for c in convs] == [26 * 26 * 3 * 3 * 1 * 4, 13 * 13 * 3 * 3 * 1 * 8]
    gemm = [n for n in report.nodes if n.op_type in ("Gemm", "MatMul")]
    assert [g.macs for g in gemm] == [8 * 13 * 13 * 10]
    assert len(report.sites) == 2 and report.model.samples == 130
    ref = _intermediates(model, [a.output for a in report.activations], x)
    for a in report.activations:
        assert a.zero_rate == pytest.approx((ref[a.output] == 0).mean(), abs=1e-12)


def _conv_relu_graph(opset: int, clip_attr_min: float | None) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [_init(rng, "w", (4, 3, 3, 3), 27), _init(rng, "w2", (4, 3, 3, 3), 27)]
    if clip_attr_min is None:
        act = helper.make_node("Relu", ["a"], ["ra"])
    else:
        act = helper.make_node("Clip", ["a"], ["ra"], min=clip_attr_min, max=6.0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3]),  # unnamed on purpose
        act,
        helper.make_node("Conv", ["x", "w2"], ["b"], name="dup", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["b"], ["rb"], name="dup"),
        helper.make_node("Add", ["b", "rb"], ["s"]),  # b has two consumers: not a site
        helper.make_node("Add", ["ra", "s"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_names_clip_attribute_and_site_rules(tmp_path):
    report = profile_model(_save(_conv_relu_graph(10, 0.0), tmp_path / "m.onnx"), runs=1)
    # named as normalize names them: the op type, a repeat gets _1
    assert [n.name for n in report.nodes] == ["Conv", "Clip", "dup", "dup_1", "Add", "out"]
    assert [a.node for a in report.activations] == ["Clip", "dup_1"]  # Clip with min 0 (opset-10 attribute)
    assert [(s.node, s.relu) for s in report.sites] == [("Conv", "Clip")]
    assert any(n.startswith("4 nodes had an empty or repeated name and were named as normalize names them")
               for n in report.notes)
    assert report.nodes[0].macs == 6 * 6 * 3 * 3 * 3 * 4

    report = profile_model(_save(_conv_relu_graph(10, -1.0), tmp_path / "m2.onnx"), runs=1)
    assert [a.node for a in report.activations] == ["dup_1"] and report.sites == []


def test_batchnorm_between_conv_and_relu_is_explained(tmp_path):
    rng = np.random.default_rng(4)
    inits = [_init(rng, "w", (4, 1, 3, 3), 9)] + [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
                                                  (("s", np.ones(4)), ("b", np.zeros(4)), ("m", np.zeros(4)),
                                                   ("v", np.ones(4)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    report = profile_model(_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                 tmp_path / "bn.onnx"), runs=1)
    assert report.sites == []
    assert any("BatchNormalization" in n for n in report.notes)
    nodes_by = {n.name: n for n in report.nodes}
    assert nodes_by["bn"].macs == 0 and nodes_by["bn"].params == 16 and nodes_by["conv"].macs == 8 * 8 * 9 * 4


def test_declared_dynamic_batch_that_only_runs_at_batch_1(tmp_path):
    """A Reshape to a constant [1, -1] breaks batching: the data pass falls back to one sample at a time."""
    rng = np.random.default_rng(5)
    inits = [_init(rng, "w", (4, 1, 3, 3), 9), numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
             _init(rng, "wfc", (4 * 8 * 8, 3), 256)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"),
             helper.make_node("MatMul", ["f", "wfc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((7, 1, 10, 10)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0], np.int64)
    report = profile_model(_save(model, tmp_path / "m.onnx"), data=_npz(tmp_path / "d.npz", x, y), runs=1)
    assert any("one sample at a time" in n for n in report.notes)
    (a,) = report.activations
    z = np.concatenate([_intermediates(model, ["r"], x[i:i + 1])["r"] for i in range(7)]) == 0
    assert a.zero_rate == pytest.approx(z.mean(), abs=1e-12) and report.model.samples == 7
    assert {n.name: n.macs for n in report.nodes}["fc"] == 256 * 3


def test_activation_without_batch_on_axis_0_is_reported_not_guessed(tmp_path):
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Transpose", ["c"], ["t"], name="swap", perm=[1, 0, 2, 3]),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "N", 4, 4])],
                              [_init(rng, "w", (4, 1, 3, 3), 9)])
    x = rng.standard_normal((3, 1, 6, 6)).astype(np.float32)
    report = profile_model(_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                 tmp_path / "t.onnx"), data=_npz(tmp_path / "d.npz", x), runs=1)
    (a,) = report.activations
    assert math.isnan(a.zero_rate) and a.per_channel == []
    assert any("do not keep the batch on axis 0" in n for n in report.notes)
    assert report.to_json()["activations"][0]["zero_rate"] is None
    console = Console(record=True, width=200)
    report.render(console)
    assert report.write_plots(tmp_path / "p")[-1].name == "latency_per_node.png"


# --------------------------------------------------------------------------- errors
@pytest.fixture
def lenet_path(tmp_path):
    return _save(lenet_like(), tmp_path / "lenet.onnx")


def test_error_data_shape_does_not_fit(lenet_path, tmp_path):
    bad = _npz(tmp_path / "bad.npz", np.zeros((3, 1, 32, 32), np.float32))
    with pytest.raises(UserError, match=r"expected \(N, 1, 28, 28\) \(dimension 2 should be 28\)") as e:
        profile_model(lenet_path, data=bad, runs=1)
    assert "\n" not in str(e.value)
    bad = _npz(tmp_path / "rank.npz", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(UserError, match="expected rank 4"):
        profile_model(lenet_path, data=bad, runs=1)


def test_error_wrong_dtype(lenet_path, tmp_path):
    bad = _npz(tmp_path / "f64.npz", np.zeros((3, 1, 28, 28), np.float64))
    with pytest.raises(UserError, match="dtype float64, expected float32"):
        profile_model(lenet_path, data=bad, runs=1)
    bad = _npz(tmp_path / "lab.npz", np.zeros((3, 1, 28, 28), np.float32), np.zeros(3, np.float32))
    with pytest.raises(UserError, match="'labels' has dtype float32, expected int64"):
        profile_model(lenet_path, data=bad, runs=1)


def test_error_other_inputs(lenet_path, tmp_path):
    with pytest.raises(UserError, match="runs is 0, expected a positive integer"):
        profile_model(lenet_path, runs=0)
    with pytest.raises(UserError, match="data file not found"):
        profile_model(lenet_path, data=tmp_path / "nope.npz", runs=1)
    with pytest.raises(UserError, match="model file not found"):
        profile_model(tmp_path / "nope.onnx", runs=1)
    dyn = lenet_like()
    dyn.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UserError, match=r"has shape \(N, 1, \?, 28\): random inputs need every dimension"):
        profile_model(_save(dyn, tmp_path / "dyn.onnx"), runs=1)


# --------------------------------------------------------------------------- the onnx model-zoo CNNs
def _vgg19_macs() -> int:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
    macs, c, hw = 0, 3, 224
    for v in cfg:
        if v == "M":
            hw //= 2
        else:
            macs += hw * hw * 3 * 3 * c * v
            c = v
    return macs + 7 * 7 * 512 * 4096 + 4096 * 4096 + 4096 * 1000


def test_light_models_are_all_here():
    assert len(LIGHT_MODELS) == 9, LIGHT_MODELS


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_profile(name):
    report = profile_model(LIGHT_DIR / name, runs=1)
    m = report.model
    assert m.params > 0 and m.macs > 0 and m.latency_median_ms > 0
    convs = [n for n in report.nodes if n.op_type == "Conv"]
    assert convs and all(n.macs > 0 and n.params > 0 for n in convs)
    assert all(len(n.output_shape) == 4 and None not in n.output_shape for n in convs)
    assert not any(n.op_type == "ConstantOfShape" for n in report.nodes)  # weights were folded
    assert any("folded" in n and "ConstantOfShape" in n for n in report.notes)
    assert report.activations and all(0.0 <= a.zero_rate <= 1.0 for a in report.activations)
    json.dumps(report.to_json(), allow_nan=False)
    if name == "light_bvlc_alexnet.onnx":  # the classic numbers: 60,965,224 weights
        assert m.params == 60_965_224
        assert convs[0].macs == 54 * 54 * 11 * 11 * 3 * 96  # 224x224 input, stride 4
        assert convs[1].macs == 26 * 26 * 5 * 5 * (96 // 2) * 256  # 2 groups
        assert len(report.sites) == 5
    if name == "light_vgg19.onnx":
        assert m.params == 143_667_240
        assert m.macs == _vgg19_macs() == 19_632_062_464
    if name == "light_resnet50.onnx":  # 25,557,032 trainable + BN running mean/var (2 x 26,560)
        assert m.params == 25_557_032 + 53_120
        assert report.sites == [] and any("BatchNormalization" in n for n in report.notes)


# --------------------------------------------------------------------------- the bundled zoo
needs_lenet5 = pytest.mark.skipif(not ZOO_LENET.is_file(),
                                  reason=f"zoo model not built yet: {ZOO_LENET} is absent")


@pytest.fixture(scope="module")
def lenet5_report() -> ProfileReport:
    return profile_model("zoo:lenet5", runs=2)


@needs_lenet5
def test_zoo_lenet5_macs(lenet5_report):
    convs = [n for n in lenet5_report.nodes if n.op_type == "Conv"]
    assert [c.macs for c in convs[:2]] == [86_400, 153_600]


@needs_lenet5
def test_zoo_lenet5_uses_the_zoo_data(lenet5_report):
    from onnxzero.data import load_dataset
    from onnxzero.zoo import default_data

    ds = load_dataset(default_data("zoo:lenet5"))
    r = lenet5_report
    assert r.model.data == str(default_data("zoo:lenet5")) and r.model.samples == len(ds)
    assert r.model.accuracy is not None and r.model.accuracy > 0.5
    assert not any("random" in n for n in r.notes)
    assert r.classes == sorted(set(ds.labels.tolist()))
    assert all(a.per_class is not None and 0 < a.zero_rate < 1 for a in r.activations)
    convs = [n.name for n in r.nodes if n.op_type == "Conv"]
    assert [s.node for s in r.sites][:2] == convs[:2]
