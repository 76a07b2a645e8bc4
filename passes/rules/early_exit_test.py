"""EarlyExitRule: check (mode, skip_zeros, input sign, predictive settings) / calibrate (predictive
thresholds only) / rewrite."""

import numpy as np

from onnxzero.passes.rules.early_exit import EarlyExitRule
from onnxzero.passes.rules.conftest import conv_relu_model
from onnxzero.passes.sites import find_sites


def test_check_reasons(plain):
    model, site, _ = plain
    rule = EarlyExitRule(model)
    assert rule.check(site, {"mode": "fast"}) == "early-exit mode 'fast' is not one of exact, predictive"
    assert rule.check(site, {"mode": "exact", "skip_zeros": 3}).startswith("early-exit skip_zeros is 3, expected")
    assert rule.check(site, {"mode": "predictive"}) == \
        "predictive early exit needs calibration data (--data) or explicit n_terms/threshold"
    assert rule.check(site, {"mode": "predictive", "n_terms": np.zeros(8, np.int64)}) == \
        "predictive early exit got n_terms without threshold: expected both or neither"
    assert rule.check(site, {"mode": "predictive", "n_terms": np.zeros(4), "threshold": np.zeros(4)}) == \
        "predictive n_terms has shape (4,), expected (8,): one per filter"
    assert rule.check(site, {"mode": "exact"}) is None  # the input is a Relu's output: non-negative


def test_exact_needs_a_nonnegative_input():
    model = conv_relu_model()
    del model.graph.node[0]  # X feeds the Conv directly: its sign is unknown
    model.graph.node[0].input[0] = "X"
    (site,) = find_sites(model)
    assert EarlyExitRule(model).check(site, {"mode": "exact"}).startswith(
        "exact early exit needs a non-negative input, and this one may be negative")


def test_calibrate_fits_only_predictive_thresholds(plain):
    model, site, cal = plain
    rule = EarlyExitRule(model, has_data=True)
    assert cal.fit(rule, site, {"mode": "exact"}) == {}
    given = {"mode": "predictive", "n_terms": np.ones(8, np.int64), "threshold": np.zeros(8, np.float32)}
    assert rule.calibrate(site, given, None) == {}  # explicit settings need no data
    fit = cal.fit(rule, site, {"mode": "predictive", "fraction": 0.25, "quantile": 0.05})
    assert fit["n_terms"].shape == (8,) and fit["threshold"].shape == (8,)


def test_rewrite(plain):
    model, site, _ = plain
    rule = EarlyExitRule(model, has_data=True)
    rep = rule.rewrite(site, {"mode": "exact", "skip_zeros": 2}, {}, "Y")
    assert rep.setting == {"mode": "exact", "skip_zeros": 2} and not rep.runtime_inputs
    fit = {"n_terms": np.full(8, 3, np.int64), "threshold": np.full(8, -1.0, np.float32)}
    rep = rule.rewrite(site, {"mode": "predictive", "fraction": 0.5, "quantile": 0.1}, fit, "Y")
    assert rep.setting == {"mode": "predictive", "fraction": 0.5, "quantile": 0.1}
    np.testing.assert_array_equal(rep.runtime_inputs["conv__n_terms"], fit["n_terms"])
    np.testing.assert_array_equal(rep.runtime_inputs["conv__threshold"], fit["threshold"])
