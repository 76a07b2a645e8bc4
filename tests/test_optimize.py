"""onnxzero optimize: the search meets eps on held-out data, writes a deployable model, refuses bad input."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxzero import zoo
from onnxzero.cli.main import cli
from onnxzero.data import load_dataset
from onnxzero.evaluate import Evaluator, top1
from onnxzero.load import load_model
from onnxzero.search import SearchOptions, optimize
from onnxzero.search.candidates import spatial_patterns
from onnxzero.search.greedy import pareto, split
from onnxzero.search.spatial_modes import layer_mask


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in r.output, err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(zoo.path("mnist"))


@pytest.fixture(scope="module")
def lenet_result(mnist):
    m = load_model("zoo:lenet5")
    opts = SearchOptions(eps=3.0, objective="macs", techniques=("early-exit", "sparse-quant", "lazy"))
    return optimize(m, mnist.inputs[:400], mnist.labels[:400], opts)


def test_search_meets_eps_and_saves_macs(lenet_result, mnist):
    r = lenet_result
    rep = r.report
    assert r.met_eps
    assert rep["optimized"]["macs"] < rep["baseline"]["macs"]
    assert rep["mac_reduction"] == pytest.approx(1 - rep["optimized"]["macs"] / rep["baseline"]["macs"])
    # eps is enforced on the calibration split; the held-out figure is reported as measured
    assert rep["validation_loss"] == pytest.approx(100 * (rep["baseline"]["accuracy"] - rep["optimized"]["accuracy"]))
    for key in ("eps", "baseline", "optimized", "sites", "search", "pareto"):
        assert key in rep
    for s in rep["sites"]:
        assert {"node", "technique", "setting", "macs_before", "macs_after"} <= set(s)
        assert s["macs_after"] <= s["macs_before"]
    assert rep["search"]["candidates_evaluated"] >= len(r.first_level) > 0
    json.dumps(rep)  # JSON-able as --report writes it


def test_optimized_model_is_deployable_and_matches_its_report(lenet_result, mnist):
    model = lenet_result.model
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    _, val = split(400, 0.5)
    acc = top1(Evaluator(model).run(mnist.inputs[:400][val]).logits, mnist.labels[:400][val])
    assert acc == pytest.approx(lenet_result.report["optimized"]["accuracy"])


def test_first_level_exact_early_exit_loses_nothing(lenet_result):
    exact = [m for m in lenet_result.first_level if m.technique == "early-exit" and m.setting.get("mode") == "exact"]
    assert exact and all(m.loss == 0 for m in exact)
    assert all(m.macs <= m.dense_macs for m in exact)  # lenet's conv2 input is post-ReLU/MaxPool


def test_eps_zero_only_takes_lossless_settings(mnist):
    m = load_model("zoo:lenet5")
    r = optimize(m, mnist.inputs[:200], mnist.labels[:200], SearchOptions(eps=0.0, objective="macs", techniques=("early-exit",)))
    assert r.met_eps
    for s in r.report["sites"]:
        if s["technique"]:
            assert s["setting"]["mode"] in ("exact", "predictive")
    assert all(c.loss <= 0 for c in r.combined if c is r.combined[-1])


def test_spatial_patterns_and_granular_masks():
    pats = spatial_patterns(2, (1, 3))
    assert len(pats) == 14  # the paper's 2^(p^2) - 2 for p = 2
    alive = np.zeros((4, 3, 4, 4), bool)
    alive[:, 0] = True  # channel 0 always alive: any prediction would lose outputs
    m = layer_mask(alive, 2, "uniform-filter", (1, 3), 0.0)
    assert m.shape == (3, 2, 2)
    assert m[0].all()  # no safe pattern: computed in full
    assert m[1].sum() == 1  # dead channel: the sparsest pattern
    full = layer_mask(alive, 2, "max-granularity", (1, 3), 0.0)
    assert full.shape == (3, 4, 4)


def test_pareto_front_drops_dominated_points():
    pts = [{"accuracy": 0.9, "macs": 10, "latency_ms": 1.0}, {"accuracy": 0.8, "macs": 20, "latency_ms": 2.0},
           {"accuracy": 0.95, "macs": 30, "latency_ms": 1.5}]
    assert pareto(pts) == [pts[0], pts[2]]


@pytest.mark.parametrize("eps", ["-1", "101"])
def test_eps_outside_range(eps, tmp_path):
    one_line_error(run("optimize", "zoo:lenet5", "--eps", eps, "-o", tmp_path / "o.onnx"), "--eps", "expected a value in [0, 100]")
    assert not (tmp_path / "o.onnx").exists()


def test_data_without_model_shape(tmp_path):
    d = tmp_path / "d.npz"
    np.savez(d, inputs=np.zeros((30, 3, 28, 28), np.float32))
    one_line_error(run("optimize", "zoo:lenet5", "--eps", "3", "--data", d, "-o", tmp_path / "o.onnx"), "should be 1")
    assert not (tmp_path / "o.onnx").exists()


def test_labels_out_of_range(tmp_path, mnist):
    d = tmp_path / "d.npz"
    np.savez(d, inputs=mnist.inputs[:30], labels=np.full(30, 12, np.int64))
    one_line_error(run("optimize", "zoo:lenet5", "--eps", "3", "--data", d, "-o", tmp_path / "o.onnx"),
                   "labels range 12..12", "expected 0..9")


def test_model_without_sites(tmp_path):
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])])
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    d = tmp_path / "d.npz"
    np.savez(d, inputs=np.zeros((30, 1, 28, 28), np.float32))
    one_line_error(run("optimize", p, "--eps", "3", "--data", d, "-o", tmp_path / "o.onnx"), "no eligible Conv+ReLU site")
    assert not (tmp_path / "o.onnx").exists()


def test_cli_writes_model_and_report(tmp_path):
    out, rep = tmp_path / "lenet.onnx", tmp_path / "r.json"
    r = run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit,sparse-quant",
            "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["optimized"]["macs"] < report["baseline"]["macs"]
    assert onnx.load(out).metadata_props  # provenance
    assert (tmp_path / "lenet.onnx.search.json").exists()  # what --resume continues from
    r2 = run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit,sparse-quant",
             "-o", out, "--resume")
    assert r2.exit_code == 0, r2.output
