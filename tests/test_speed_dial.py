"""The run-time speed dial: NSGA-II front of run-time settings behind one `speed` input.

Latency is measured by a deterministic stand-in (the ops' own MAC counters of one real run), so the
front and every figure are reproducible; the real median-latency measurer is the default and is
exercised by the CLI, never asserted here.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxzero import UserError, get_library_path, zoo
from onnxzero.evaluate import Evaluator, top1
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import rewrite
from onnxzero.passes.sites import find_sites
from onnxzero.speed_dial import SPEED, Measured, non_dominated, runtime_knobs, seed_from_model, speed_dial

LENET = {"/features/features.0/Conv": {"technique": "lazy", "ratio": 0.75},
         "/features/features.3/Conv": {"technique": "lazy", "ratio": 0.5}}


def macs_latency(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    """Deterministic 'latency': the MACs the custom ops report for this one run."""
    out = sess.run(None, feeds)
    return float(sum(int(o) for o in out[1:] if np.ndim(o) == 0 and o.dtype == np.int64))


@pytest.fixture(scope="module")
def mnist():
    d = np.load(zoo.path("mnist"))
    return d["inputs"], d["labels"]


@pytest.fixture(scope="module")
def lenet(mnist):
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("lenet5")))
    res = speed_dial(base, (x[:300], y[:300]), (x[500:], y[500:]), eps=5, seed_config=LENET, points=4,
                     pop_size=10, generations=5, latency=macs_latency, normalized=True)
    return base, res


def fresh_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_front_is_non_dominated_within_eps_and_ordered(lenet):
    _, res = lenet
    pts = res.report["points"]
    assert 2 <= len(pts) <= 4
    assert [p["speed"] for p in pts] == [i / (len(pts) - 1) for i in range(len(pts))]
    s = [p["search"] for p in pts]
    assert all(p["loss"] <= 5 for p in s)
    for p in s:  # no other evaluated point within eps beats it on both objectives
        for q in res.evaluated:
            if q.loss <= 5:
                assert not (q.accuracy >= p["accuracy"] and q.latency_ms <= p["latency_ms"]
                            and (q.accuracy, q.latency_ms) != (p["accuracy"], p["latency_ms"]))
    # most accurate first, fastest last, strictly along the front
    assert all(a["accuracy"] > b["accuracy"] and a["latency_ms"] > b["latency_ms"] for a, b in zip(s, s[1:]))
    # the greedy seed was evaluated (NSGA-II's initial population)
    assert res.report["nsga2"]["evaluated"] >= 10
    seed_genome = tuple(k["greedy_option"] for k in res.report["sites"])
    assert seed_genome in {m.genome for m in res.evaluated}


def test_non_dominated_helper():
    pts = [Measured((0,), 0.9, 0, 10, 5.0), Measured((1,), 0.9, 0, 9, 5.0), Measured((2,), 0.8, 0, 8, 6.0),
           Measured((3,), 0.7, 0, 7, 2.0), Measured((4,), 0.95, 0, 20, 9.0)]
    assert [p.genome for p in non_dominated(pts)] == [(4,), (1,), (3,)]


def test_emitted_model_is_one_knob(lenet):
    base, res = lenet
    m = res.model
    onnx.checker.check_model(m, full_check=True)
    inputs = {i.name: i for i in m.graph.input}
    assert list(inputs) == [base.graph.input[0].name, SPEED]
    t = inputs[SPEED].type.tensor_type
    assert t.elem_type == onnx.TensorProto.FLOAT and len(t.shape.dim) == 0
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    assert init[SPEED] == np.float32(0)
    # each lazy op reads its ratio from a Gather on a (P,) table whose rows are the report's ratios
    lazy = [n for n in m.graph.node if n.op_type == "LazyConv"]
    assert len(lazy) == 2
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in lazy:
        g = producers[n.input[5]]
        assert g.op_type == "Gather"
        site = next(s.name for s in find_sites(base) if (s.x, s.w) == (n.input[0], n.input[1]))
        rows = [p["settings"][site]["ratio"] for p in res.report["points"]]
        np.testing.assert_allclose(init[g.input[0]], np.asarray(rows, np.float32))
    # runs with the library, outside onnxzero's own session helper; no speed fed = speed 0
    sess = fresh_session(m)
    x = np.load(zoo.path("mnist"))["inputs"][500:510]
    a = sess.run(None, {base.graph.input[0].name: x})[0]
    b = sess.run(None, {base.graph.input[0].name: x, SPEED: np.asarray(0, np.float32)})[0]
    np.testing.assert_array_equal(a, b)


def test_each_speed_reproduces_report_on_held_out_data(lenet, mnist):
    base, res = lenet
    x, y = mnist
    ev = Evaluator(res.model)  # a fresh session: nothing carried over from the search
    float_macs_rest = res.report["baseline"]["macs"] - sum(
        s.macs for s in find_sites(base) if s.name in LENET)
    for p in res.report["points"]:
        r = ev.run(x[500:], feeds={SPEED: np.asarray(p["speed"], np.float32)})
        assert top1(r.logits, y[500:]) == p["accuracy"]
        assert r.macs == p["op_macs"] and float_macs_rest + r.macs == p["macs"]
        # the same as a model rewritten with that point's settings frozen as constants
        cfg = {s: {"technique": "lazy", "ratio": v["ratio"]} for s, v in p["settings"].items()}
        frozen, _ = rewrite(base, config={"sites": cfg}, inputs=x[:300], labels=y[:300], normalized=True,
                            runtime_settings=False)
        np.testing.assert_array_equal(Evaluator(frozen).run(x[500:]).logits, r.logits)
    first, last = res.report["points"][0], res.report["points"][-1]
    assert first["macs"] > last["macs"]  # the two ends of the dial really differ


def test_speed_is_clamped_and_rounds_to_nearest_point(lenet, mnist):
    _, res = lenet
    x = mnist[0][500:600]
    ev = Evaluator(res.model)
    n = len(res.report["points"])

    def macs(s):
        return ev.run(x, feeds={SPEED: np.asarray(s, np.float32)}).macs

    ends = macs(0.0), macs(1.0)
    assert ends[0] != ends[1]
    assert macs(-3.0) == ends[0] and macs(float("nan")) == ends[0]
    assert macs(7.5) == ends[1] and macs(float("inf")) == ends[1]
    step = 1.0 / (n - 1)
    per_point = [macs(i * step) for i in range(n)]
    assert macs(0.49 * step) == per_point[0]
    assert macs(0.5 * step) == per_point[1]  # exactly half way: the faster point
    assert macs(1.0 - 0.49 * step) == per_point[-1]


def test_runtime_knobs_found_by_walking_the_graph(mnist):
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("lenet5")))
    sites = find_sites(base)
    cfg = {sites[0].name: {"technique": "lazy", "ratio": 0.6}, sites[1].name: {"technique": "early-exit", "mode": "exact"}}
    m, _ = rewrite(base, config={"sites": cfg}, inputs=x[:100], labels=y[:100], normalized=True)
    assert runtime_knobs(m, sites) == {sites[0].name: {"ratio": f"{sites[0].name}__ratio"}}
    # frozen predictive settings are constants, not knobs; the lazy ratio stays a run-time input
    cfg[sites[1].name] = {"technique": "early-exit", "mode": "predictive", "fraction": 0.5, "quantile": 0.05}
    m, _ = rewrite(base, config={"sites": cfg}, inputs=x[:100], labels=y[:100], normalized=True, runtime_settings=False)
    assert runtime_knobs(m, sites) == {sites[0].name: {"ratio": f"{sites[0].name}__ratio"}}
    m, _ = rewrite(base, config={"sites": cfg}, inputs=x[:100], labels=y[:100], normalized=True)
    assert runtime_knobs(m, sites)[sites[1].name] == {"n_terms": f"{sites[1].name}__n_terms",
                                                     "threshold": f"{sites[1].name}__threshold"}


def test_bad_input_is_one_line_user_error(mnist):
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("lenet5")))
    data = (x[:60], y[:60]), (x[60:90], y[60:90])
    kw = dict(eps=3, latency=macs_latency, normalized=True, pop_size=4, generations=1)
    with pytest.raises(UserError, match=r"^--points is 1, expected an integer >= 2 \(the most accurate and the fastest point\)$"):
        speed_dial(base, *data, seed_config=LENET, points=1, **kw)
    sites = find_sites(base)
    fixed = {sites[0].name: {"technique": "sparse-quant", "prune": 0.5}, sites[1].name: {"technique": "early-exit", "mode": "exact"}}
    with pytest.raises(UserError) as e:
        speed_dial(base, *data, seed_config=fixed, **kw)
    assert str(e.value) == ("--pareto needs a run-time-settable technique in the greedy result (lazy, spatial or "
                            "predictive early-exit), got only early-exit, sparse-quant")
    with pytest.raises(UserError, match="^--pareto needs the greedy result's per-site config, and it is empty"):
        speed_dial(base, *data, seed_config={}, **kw)


def test_resnet_mixed_techniques(mnist):
    """Spatial mask, lazy ratio and predictive early-exit knobs in one dial (plain sites of a ResNet)."""
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("resnet-mnist")))
    plain = [s for s in find_sites(base) if s.residual is None]
    techs = [{"technique": "spatial", "patch": 2}, {"technique": "lazy", "ratio": 0.75},
             {"technique": "early-exit", "mode": "predictive", "fraction": 0.5, "quantile": 0.02},
             {"technique": "sparse-quant", "prune": 0.7}]  # fixed: not a run-time setting
    seed = {s.name: t for s, t in zip(plain, techs)}
    res = speed_dial(base, (x[:100], y[:100]), (x[900:], y[900:]), eps=3, seed_config=seed, points=3,
                     pop_size=8, generations=3, latency=macs_latency, normalized=True)
    onnx.checker.check_model(res.model, full_check=True)
    kinds = {k["technique"]: k["inputs"] for k in res.report["sites"]}
    assert set(kinds) == {"spatial", "lazy", "early-exit"}
    assert sum(n.op_type == "SparseQuantConv" for n in res.model.graph.node) == 1
    graph_inputs = {i.name for i in res.model.graph.input}
    assert not graph_inputs & {n for v in kinds.values() for n in v}  # replaced by the tables
    ev = Evaluator(res.model)
    for p in res.report["points"]:
        r = ev.run(x[900:], feeds={SPEED: np.asarray(p["speed"], np.float32)})
        assert top1(r.logits, y[900:]) == p["accuracy"] and r.macs == p["op_macs"]


def test_seed_from_model_recovers_the_deployed_config(mnist):
    """The greedy result is a model: its config (constants included) rewrites the float model identically."""
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("resnet-mnist")))
    plain = [s for s in find_sites(base) if s.residual is None]
    cfg = {plain[0].name: {"technique": "spatial", "patch": 2, "mask": [[0, 1], [1, 0]]},
           plain[1].name: {"technique": "lazy", "ratio": 0.6},
           plain[2].name: {"technique": "early-exit", "mode": "predictive", "fraction": 0.25, "quantile": 0.05},
           plain[3].name: {"technique": "sparse-quant", "prune": 0.7}}
    deployed, _ = rewrite(base, config={"sites": cfg}, inputs=x[:100], labels=y[:100], normalized=True,
                          runtime_settings=False)
    seed = seed_from_model(deployed, base)
    assert seed[plain[0].name] == {"technique": "spatial", "patch": 2, "mask": [[0, 1], [1, 0]]}
    assert seed[plain[1].name] == {"technique": "lazy", "ratio": 0.6000000238418579}
    assert set(seed[plain[2].name]) == {"technique", "mode", "n_terms", "threshold"}
    assert seed[plain[3].name]["technique"] == "sparse-quant"
    # the same calibration data: the lazy predictor is fitted on it (not a setting)
    again, _ = rewrite(base, config={"sites": seed}, inputs=x[:100], labels=y[:100], normalized=True,
                       runtime_settings=False)
    np.testing.assert_array_equal(Evaluator(again).run(x[900:]).logits, Evaluator(deployed).run(x[900:]).logits)
    with pytest.raises(UserError, match="^the optimized model has no onnxzero provenance"):
        seed_from_model(base, base)


def test_lucky_first_timings_do_not_make_the_front(mnist):
    """A measurer whose first run of every setting is absurdly fast (noise): the search's single
    timings would put only the most accurate point on the front; re-timing the candidates restores
    the real trade-off."""
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("lenet5")))
    seen: set[bytes] = set()

    def lucky(sess, feeds):
        key = b"".join(np.asarray(v).tobytes() for k, v in sorted(feeds.items()) if k != base.graph.input[0].name)
        if key not in seen:
            seen.add(key)
            return 0.0
        return macs_latency(sess, feeds)

    res = speed_dial(base, (x[:300], y[:300]), (x[500:], y[500:]), eps=5, seed_config=LENET, points=4,
                     pop_size=10, generations=5, latency=lucky, normalized=True)
    pts = res.report["points"]
    assert len(pts) >= 2 and res.report["nsga2"]["retimed"] >= len(pts)
    assert all(p["search"]["latency_ms"] > 0 for p in pts)  # the median of the rounds, not the lucky run


def test_macs_objective(lenet, mnist):
    x, y = mnist
    base, _ = lenet
    res = speed_dial(base, (x[:300], y[:300]), (x[500:], y[500:]), eps=5, seed_config=LENET, points=3,
                     pop_size=8, generations=3, latency=macs_latency, objective="macs", normalized=True)
    s = [p["search"] for p in res.report["points"]]
    assert res.report["objective"] == "macs" and res.report["nsga2"]["retimed"] == 0
    assert all(a["accuracy"] > b["accuracy"] and a["macs"] > b["macs"] for a, b in zip(s, s[1:]))
    with pytest.raises(UserError, match="^--objective is 'energy', expected latency or macs$"):
        speed_dial(base, (x[:60], y[:60]), (x[60:90], y[60:90]), eps=3, seed_config=LENET, objective="energy",
                   normalized=True)


def test_pareto_options_checked_before_the_search():
    from onnxzero.speed_dial import check_pareto_options

    check_pareto_options(2, ("sparse-quant", "lazy"))  # must not fire
    with pytest.raises(UserError, match=r"^--points is 0, expected an integer >= 2"):
        check_pareto_options(0, ("lazy",))
    with pytest.raises(UserError) as e:
        check_pareto_options(8, ("sparse-quant",))
    assert str(e.value) == ("--pareto needs a run-time-settable technique (lazy, spatial or predictive early-exit) "
                            "in --techniques, got sparse-quant")


def test_site_with_a_single_option_is_fixed_yet_folded_into_the_dial(mnist):
    """A per-filter all-ones spatial mask has no other option of its shape: NSGA-II varies only the
    lazy site, and the spatial site still reads its mask from the speed table (no leftover input)."""
    x, y = mnist
    base, _ = normalize(onnx.load(zoo.path("lenet5")))
    s0, s1 = find_sites(base)
    seed = {s0.name: {"technique": "spatial", "patch": 2, "mask": np.ones((6, 2, 2), np.uint8).tolist()},
            s1.name: {"technique": "lazy", "ratio": 0.5}}
    res = speed_dial(base, (x[:200], y[:200]), (x[500:700], y[500:700]), eps=5, seed_config=seed, points=3,
                     pop_size=6, generations=2, latency=macs_latency, normalized=True)
    assert [k["options"] for k in res.report["sites"]] == [1, 8]
    assert [i.name for i in res.model.graph.input] == [base.graph.input[0].name, SPEED]
    init = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    table = init[f"{s0.name}__mask__table"]
    assert table.shape == (len(res.report["points"]), 6, 2, 2) and table.min() == 1


def test_render_lists_every_point_with_full_site_names(lenet):
    from rich.console import Console

    from onnxzero.speed_dial import render

    _, res = lenet
    con = Console(record=True, width=60, color_system=None, file=io.StringIO())
    render(res.report, con)
    text = con.export_text()
    for site in LENET:
        ratios = " | ".join(f"ratio {p['settings'][site]['ratio']:g}" for p in res.report["points"])
        assert f"{site} (lazy): {ratios}" in text
    assert f"{res.report['points'][-1]['macs']:,}" in text and "│ float │" in text


def test_pick_spreads_points_by_cost():
    from onnxzero.speed_dial import pick

    costs = [100.0, 99.9, 99.8, 60.0, 50.0, 20.0, 10.0]
    front = [Measured((i,), 1 - i / 10, 0, int(c), c) for i, c in enumerate(costs)]
    assert [m.genome[0] for m in pick(front, 4)] == [0, 3, 4, 6]  # targets 100, 70 (-> 60), 40 (-> 50), 10
    assert pick(front, 7) == front and len(pick(front, 2)) == 2
