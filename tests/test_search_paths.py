"""Search paths no other test covers (issue 13 item 4): the CLI's default objective (latency) with an
injected deterministic measurer, --jobs 2 against --jobs 1, spatial masks inside optimize, --resume
with changed data, and LazyConv under concurrent Run of one session.

tests/test_search_decision.py already checks, through optimize(measurer=...), that a slower
combination is never emitted, that the original is kept when every rewrite is slower, and that ties
go to the smaller accuracy loss; here the same kind of measurer goes through the command line,
which builds its own measurer and passes no --objective.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import run_concurrently
import onnx
import pytest
from click.testing import CliRunner

from onnxzero import zoo
from onnxzero.cli.main import cli
from onnxzero.data import load_dataset
from onnxzero.evaluate import Evaluator, session, top1
from onnxzero.load import load_model
from onnxzero.passes.rewrite import provenance, rewrite
from onnxzero.search import SearchOptions, optimize
from onnxzero.search.greedy import split

A, B = "/features/features.0/Conv", "/features/features.3/Conv"  # lenet5's two sites


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(zoo.path("mnist"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mnist):
    d = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(d, inputs=mnist.inputs[:200], labels=mnist.labels[:200])
    return d


class SiteCostMeasurer:
    """Whole-model latency = 1 ms + cost(the sites the model rewrites, read from its provenance);
    the original takes 1 ms."""

    def __init__(self, cost):
        self.cost, self.calls = cost, 0

    def compare(self, model, original, sample, *, runs):
        self.calls += 1
        return 1.0 + self.cost(frozenset((provenance(model) or {}).get("sites", {}))), 1.0


def test_cli_default_objective_is_latency_and_emits_only_what_buys_time(tmp_path, small_data, monkeypatch):
    # A's op costs 10 %, B's saves 20 %: the written model rewrites B alone, at ratio 0.8
    measurer = SiteCostMeasurer(lambda sites: -0.2 * (B in sites) + 0.1 * (A in sites))
    monkeypatch.setattr("onnxzero.search.greedy.OrtMeasurer", lambda: measurer)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = run("optimize", "zoo:lenet5", "--eps", "5", "--techniques", "early-exit", "--data", small_data,
            "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["objective"] == "latency" and measurer.calls > 0
    assert report["decision"]["written"] and report["latency_ratio"] == pytest.approx(0.8)
    assert set(provenance(onnx.load(out))["sites"]) == {B}


def test_cli_default_objective_writes_nothing_when_no_rewrite_pays(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr("onnxzero.search.greedy.OrtMeasurer", lambda: SiteCostMeasurer(lambda sites: 0.05 * len(sites)))
    out = tmp_path / "o.onnx"
    r = run("optimize", "zoo:lenet5", "--eps", "5", "--techniques", "early-exit", "--data", small_data, "-o", out)
    assert r.exit_code == 0, r.output
    assert "no faster model within eps 5: the original is the fastest on this machine (best found x1.05)" in r.output
    assert not out.exists()


def _chosen(report):
    return [(s["node"], s["technique"], s["setting"]) for s in report["sites"]]


def test_jobs_2_finds_the_same_configuration_as_jobs_1(tmp_path, small_data):
    reports = {}
    for jobs in (1, 2):
        rep = tmp_path / f"r{jobs}.json"
        r = run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit,lazy",
                "--data", small_data, "-o", tmp_path / f"o{jobs}.onnx", "--report", rep, "--jobs", jobs)
        assert r.exit_code == 0, r.output
        reports[jobs] = json.loads(rep.read_text())
    one, two = reports[1], reports[2]
    assert any(t for _, t, _ in _chosen(one))  # something was chosen, so the comparison means something
    assert _chosen(two) == _chosen(one)
    for key in ("calibration_loss", "validation_loss"):
        assert two[key] == one[key]
    assert two["optimized"]["macs"] == one["optimized"]["macs"]
    assert two["search"]["first_level"] == one["search"]["first_level"]
    assert provenance(onnx.load(tmp_path / "o2.onnx")) == provenance(onnx.load(tmp_path / "o1.onnx"))


def test_spatial_inside_optimize_writes_masks_that_skip_what_the_report_says(mnist):
    x, y = mnist.inputs[:200], mnist.labels[:200]
    r = optimize(load_model("zoo:lenet5"), x, y, SearchOptions(eps=3.0, objective="macs", techniques=("spatial",)))
    rep = r.report
    assert r.met_eps and rep["decision"]["written"]
    spatial = [n for n in r.model.graph.node if n.op_type == "SpatialConv"]
    chosen = {s["node"]: s for s in rep["sites"] if s["technique"]}
    assert len(spatial) == len(chosen) >= 1 and {s["technique"] for s in chosen.values()} == {"spatial"}
    for s in chosen.values():
        st = s["setting"]
        assert st["mask_shape"] == [st["patch"]] * 2 and 0 < st["mask_ones"] < 1  # a real prediction
        assert s["macs_after"] < s["macs_before"]
    # the written model, run on the held-out split, gives the report's accuracy and MACs
    _, val = split(len(x), 0.5)
    got = Evaluator(r.model).run(x[val])
    assert top1(got.logits, y[val]) == pytest.approx(rep["optimized"]["accuracy"])
    assert got.macs + (rep["baseline"]["macs"] - sum(s["macs_before"] for s in chosen.values())) == rep["optimized"]["macs"]
    assert rep["validation_loss"] <= 3.0


def test_resume_with_changed_data_ignores_the_cache_in_one_line(tmp_path, small_data, mnist):
    cache = tmp_path / "o.onnx.search.json"
    opts = SearchOptions(eps=3.0, objective="macs", techniques=("early-exit",))
    optimize(load_model("zoo:lenet5"), mnist.inputs[:200], mnist.labels[:200], opts, cache_path=cache)
    assert cache.exists()
    changed = tmp_path / "changed.npz"  # same shapes, same labels, one pixel of one digit differs
    x = mnist.inputs[:200].copy()
    x[7, 0, 14, 14] += 0.25
    np.savez(changed, inputs=x, labels=mnist.labels[:200])
    r = run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit",
            "--data", changed, "-o", tmp_path / "o.onnx", "--resume")
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if "--resume" in ln]
    assert notes == [f"onnxzero: --resume: ignored {cache}: it was made for another model, data, split or options; "
                     "starting afresh"]
    assert "resumed" not in r.stderr and (tmp_path / "o.onnx").exists() and not cache.exists()


def test_lazy_conv_under_concurrent_runs_of_one_session(mnist):
    x = mnist.inputs[:64]
    model, report = rewrite(load_model("zoo:lenet5"), technique="lazy", config={"default": {"ratio": 0.5}}, inputs=x)
    assert {s.technique for s in report.sites} == {"lazy"}
    sess = session(model, threads=2)
    name = sess.get_inputs()[0].name
    chunks = [x[i:i + 4] for i in range(0, len(x), 4)]
    serial = [sess.run(None, {name: c}) for c in chunks]
    results: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def worker(t: int) -> None:
        for rep in range(3):  # each thread runs every chunk, in its own order
            for i in np.random.default_rng(t * 10 + rep).permutation(len(chunks)):
                results[t, rep, int(i)] = sess.run(None, {name: chunks[i]})

    run_concurrently(range(4), worker)
    assert len(results) == 4 * 3 * len(chunks)
    for (_, _, i), outs in results.items():
        for got, want in zip(outs, serial[i], strict=True):
            np.testing.assert_array_equal(got, want)
