"""SparseQuantRule: check / calibrate (magnitude: the pruning threshold, given, at a fraction, or from
the sensitivity analysis; obs: the pruned and updated weights) / rewrite (compressed weights replace
the dense W)."""

import numpy as np

from onnxzero.ops.early_exit import conv_relu_reference, im2col
from onnxzero.passes.rules.base import weight
from onnxzero.passes.rules.sparse_quant import SparseQuantRule, input_gram, obs_prune


def test_check_reasons(plain):
    model, site, _ = plain
    rule = SparseQuantRule(model)
    assert rule.check(site, {"prune": 1.5}) == "sparse-quant prune is 1.5, expected a number in [0, 1]"
    assert rule.check(site, {"max_loss": 1.0}).startswith("sparse-quant needs calibration data (--data)")
    assert rule.check(site, {"prune": 0.5}) is None  # a pruned fraction needs no data
    assert rule.check(site, {"prune": 0.5, "method": "obs"}) == \
        "sparse-quant method obs needs calibration data (--data) for the layer's inputs"
    assert SparseQuantRule(model, has_data=True).check(site, {"prune": 0.5, "method": "l1"}) == \
        "sparse-quant method is 'l1', expected one of obs, magnitude"
    assert SparseQuantRule(model, has_data=True).check(site, {"threshold": 0.1, "method": "obs"}) == \
        "sparse-quant method obs takes a prune fraction or max_loss, not a magnitude threshold"


def test_calibrate_thresholds(plain):
    model, site, cal = plain
    rule = SparseQuantRule(model, has_data=True)
    w = np.sort(np.abs(weight(model, "W")).ravel())  # 216 weights
    assert rule.calibrate(site, {"threshold": 0.3}, None) == {"threshold": 0.3}
    assert rule.calibrate(site, {"prune": 0.0}, None) == {"threshold": 0.0}
    thr = rule.calibrate(site, {"prune": 0.5}, None)["threshold"]
    assert (w < thr).sum() == 108  # exactly half of the weights fall below it
    fit = cal.fit(rule, site, {"max_loss": 100.0, "method": "magnitude"})  # every fraction passes: the boldest is taken
    assert (w < fit["threshold"]).sum() == round(0.95 * 216)
    assert fit["stats"]["max_loss"] == 100.0 and len(fit["stats"]["sensitivity"]) == 12


def test_rewrite_replaces_the_dense_weight(plain):
    model, site, _ = plain
    rep = SparseQuantRule(model).rewrite(site, {"prune": 0.5}, {"threshold": 0.2}, "Y")
    (node,) = rep.nodes
    assert node.input[0] == "xr" and rep.drop_initializers == ["W"]
    assert rep.setting["threshold"] == 0.2 and 0 < rep.stats["%W_Z"] < 100


def _output_error(site, x, w, w2):
    """||conv(x, w) - conv(x, w2)||^2 before the ReLU: what OBS minimizes."""
    cols, _ = im2col(x, site.w_shape, pads=site.pads)
    d = (w - w2).reshape(len(w), -1).astype(np.float64)
    return float(np.sum((d @ cols[:, 0]) ** 2))


def test_obs_keeps_the_layer_output_better_than_magnitude(plain):
    model, site, cal = plain
    w = weight(model, "W")
    grams = input_gram(site, cal)
    x = cal.tensors([site.x])[site.x]
    for f in (0.5, 0.8):
        wo = obs_prune(w, grams, f)
        assert np.count_nonzero(wo == 0) == round(f * w.size)  # one block of 27 columns: f of its 216 weights
        mags = np.sort(np.abs(w).ravel())
        wm = np.where(np.abs(w) >= mags[round(f * w.size)], w, 0)
        assert np.count_nonzero(wm == 0) == np.count_nonzero(wo == 0)
        assert _output_error(site, x, w, wo) < 0.97 * _output_error(site, x, w, wm)  # iid inputs: little to compensate
    assert np.array_equal(obs_prune(w, grams, 0.0), w)  # nothing pruned, nothing updated


def test_obs_with_white_inputs_is_magnitude_pruning():
    """With uncorrelated unit-variance inputs (H = I) no survivor can compensate: OBS prunes the
    smallest magnitudes and leaves the rest as they are (damping scales H, not the order)."""
    w = np.random.default_rng(3).standard_normal((4, 2, 3, 3)).astype(np.float32)
    wo = obs_prune(w, [np.eye(18)], 0.5)
    mags = np.sort(np.abs(w).ravel())
    assert np.array_equal(wo, np.where(np.abs(w) >= mags[36], w, 0))


def test_obs_moves_a_pruned_weight_onto_its_correlated_twin():
    """Two inputs that carry nearly the same signal: pruning one, OBS adds its weight to the other,
    so the output barely changes; magnitude pruning loses the pruned input's whole contribution."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(4000)
    x = np.stack([a, a + 0.01 * rng.standard_normal(4000)])  # (2, n)
    w = np.array([[1.0, 1.1]], np.float32).reshape(1, 2, 1, 1)
    wo = obs_prune(w, [x @ x.T / x.shape[1]], 0.5, damp=1e-6)
    assert wo[0, 0, 0, 0] == 0 and abs(wo[0, 1, 0, 0] - 2.1) < 0.01
    err_obs = np.sum(((w - wo).reshape(1, 2) @ x) ** 2)
    err_mag = np.sum(((w - np.array([0, 1.1]).reshape(1, 2, 1, 1)).reshape(1, 2) @ x) ** 2)
    assert err_obs < 1e-3 * err_mag


def test_obs_prunes_dead_inputs_first():
    """A channel that is zero on every calibration input costs nothing to prune: its weights go first."""
    w = np.random.default_rng(4).standard_normal((4, 2, 1, 1)).astype(np.float32) + 3.0  # all large
    h = np.diag([1.0, 0.0])  # channel 1 never fires
    wo = obs_prune(w, [h], 0.5)
    assert np.all(wo[:, 1] == 0) and np.all(wo[:, 0] == w[:, 0])


def test_calibrate_with_data_prunes_by_obs(plain):
    model, site, cal = plain
    rule = SparseQuantRule(model, has_data=True)
    fit = cal.fit(rule, site, {"prune": 0.5})
    assert fit["method"] == "obs" and np.count_nonzero(fit["weights"] == 0) == 108
    assert cal.fit(rule, site, {"prune": 0.5}) is fit  # memoized per site and setting
    rep = rule.rewrite(site, {"prune": 0.5}, fit, "Y")
    assert rep.setting["method"] == "obs" and rep.setting["prune"] == 0.5  # as asked: rewriting with it is reproducible
    assert rep.stats["nonzeros"] <= 108  # 8-bit rounding may drop a few more
    # the op computes the pruned, updated weights (8-bit)
    x = cal.tensors([site.x])[site.x][:4]
    from onnxzero.ops import sparse_quant as op
    (node,) = rep.nodes
    comp = {"values": rep.initializers[node.input[1]], "index": rep.initializers[node.input[2]],
            "row_ptr": rep.initializers[node.input[3]], "frac_bits": fit_bits(node), "weight_shape": (8, 3, 3, 3)}
    y, _ = op.reference(x, comp, weight(model, "B"), pads=(1, 1, 1, 1))
    ref = conv_relu_reference(x, fit["weights"], weight(model, "B"), pads=(1, 1, 1, 1))
    assert np.abs(y - ref).max() < 2.0 ** -comp["frac_bits"] * 27 * np.abs(x).max()


def fit_bits(node):
    return next(a.i for a in node.attribute if a.name == "frac_bits")
