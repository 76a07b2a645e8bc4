"""SparseQuantRule: check / calibrate (the pruning threshold: given, at a fraction, or from the
sensitivity analysis) / rewrite (compressed weights replace the dense W)."""

import numpy as np

from onnxzero.passes.rules.base import weight
from onnxzero.passes.rules.sparse_quant import SparseQuantRule


def test_check_reasons(plain):
    model, site, _ = plain
    rule = SparseQuantRule(model)
    assert rule.check(site, {"prune": 1.5}) == "sparse-quant prune is 1.5, expected a number in [0, 1]"
    assert rule.check(site, {"max_loss": 1.0}).startswith("sparse-quant needs calibration data (--data)")
    assert rule.check(site, {"prune": 0.5}) is None  # a pruned fraction needs no data


def test_calibrate_thresholds(plain):
    model, site, cal = plain
    rule = SparseQuantRule(model, has_data=True)
    w = np.sort(np.abs(weight(model, "W")).ravel())  # 216 weights
    assert rule.calibrate(site, {"threshold": 0.3}, None) == {"threshold": 0.3}
    assert rule.calibrate(site, {"prune": 0.0}, None) == {"threshold": 0.0}
    thr = rule.calibrate(site, {"prune": 0.5}, None)["threshold"]
    assert (w < thr).sum() == 108  # exactly half of the weights fall below it
    fit = cal.fit(rule, site, {"max_loss": 100.0})  # every fraction passes: the most aggressive is taken
    assert (w < fit["threshold"]).sum() == round(0.95 * 216)
    assert fit["stats"]["max_loss"] == 100.0 and len(fit["stats"]["sensitivity"]) == 12


def test_rewrite_replaces_the_dense_weight(plain):
    model, site, _ = plain
    rep = SparseQuantRule(model).rewrite(site, {"prune": 0.5}, {"threshold": 0.2}, "Y")
    (node,) = rep.nodes
    assert node.input[0] == "xr" and rep.drop_initializers == ["W"]
    assert rep.setting["threshold"] == 0.2 and 0 < rep.stats["%W_Z"] < 100
