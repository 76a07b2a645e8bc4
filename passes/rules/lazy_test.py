"""LazyRule: check / calibrate (the predictor fit, once per site) / rewrite (pure)."""

import numpy as np

from onnxzero.ops import lazy as op
from onnxzero.passes.rules.base import Calibration
from onnxzero.passes.rules.conftest import conv_relu_model
from onnxzero.passes.rules.lazy import LazyRule
from onnxzero.passes.sites import find_sites


def test_check_reasons(plain):
    model, site, _ = plain
    assert LazyRule(model).check(site, {"ratio": 0.5}) == "lazy needs calibration data (--data FILE.npz)"
    rule = LazyRule(model, has_data=True)
    assert rule.check(site, {"ratio": 0}) == "lazy ratio 0 is outside (0, 1]"
    assert rule.check(site, {"ratio": 1.5}) == "lazy ratio 1.5 is outside (0, 1]"
    assert rule.check(site, {"ratio": 1}) is None  # must not refuse the no-skip setting


def test_calibrate_fits_once_per_site_and_reuses_it_for_every_ratio(plain):
    model, site, cal = plain
    rule = LazyRule(model, has_data=True)
    a = cal.fit(rule, site, {"ratio": 0.5})
    b = cal.fit(rule, site, {"ratio": 0.25})
    assert a["pred_w"] is b["pred_w"]  # one predictor fit for both ratios
    assert a["pred_w"].shape == (3, 8) and a["pred_b"].shape == (8,)
    assert a["pred_v"] is None  # 3 x 8 weights: no rank halves them, the predictor stays full
    # the hit rate is the ratio's own: computing all 8 filters always finds the top-n
    assert cal.fit(rule, site, {"ratio": 1.0})["top_n_hit_rate"] == 1.0
    assert 0 <= a["top_n_hit_rate"] <= 1


def test_rewrite_is_pure_and_places_the_fit(plain):
    model, site, _ = plain
    rule = LazyRule(model, has_data=True)
    fit = {"pred_w": np.arange(24, dtype=np.float32).reshape(3, 8), "pred_b": np.ones(8, np.float32),
           "top_n_hit_rate": 0.75}
    rep = rule.rewrite(site, {"ratio": 0.5}, fit, "Y")  # no calibration anywhere: nothing to run
    (node,) = rep.nodes
    assert node.op_type == op.OP and list(node.input) == ["xr", "W", "B", "Y__pred_W", "Y__pred_b", "conv__ratio"]
    np.testing.assert_array_equal(rep.initializers["Y__pred_W"], fit["pred_w"])
    assert float(rep.runtime_inputs["conv__ratio"]) == 0.5
    assert rep.setting == {"ratio": 0.5} and rep.stats == {"top_n_hit_rate": 0.75}


def test_residual_site_predicts_from_input_and_shortcut(residual):
    model, site, cal = residual
    rule = LazyRule(model, has_data=True)
    fit = cal.fit(rule, site, {"ratio": 0.5})
    assert fit["pred_w"].shape == (3 + 8, 8)  # (C + K, K): the input's and the shortcut's strengths
    (node,) = rule.rewrite(site, {"ratio": 0.5}, fit, "Y").nodes
    assert node.input[-1] == "sc"


def test_calibrate_factors_a_predictor_its_samples_cannot_fill():
    """8 samples fit a predictor of rank <= 9: on a 64 -> 64 site it becomes (64, r) @ (r, 64), r <= 16,
    ranking the filters as well on those samples, and the rewrite places pred_V."""
    model = conv_relu_model(c=64, k=64)
    (site,) = find_sites(model)
    x = np.random.default_rng(2).standard_normal((8, 64, 8, 8)).astype(np.float32)
    rule = LazyRule(model, has_data=True)
    fit = Calibration(model, x).fit(rule, site, {"ratio": 0.5})
    r = fit["pred_v"].shape[0]
    assert fit["pred_w"].shape == (64, r) and fit["pred_v"].shape == (r, 64) and r <= 16
    rep = rule.rewrite(site, {"ratio": 0.5}, fit, "Y")
    assert rep.nodes[0].input[7] == "Y__pred_V" and rep.stats["predictor_rank"] == r
