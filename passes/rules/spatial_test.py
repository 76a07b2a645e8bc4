"""SpatialRule: check (patch, mask against the site's shape) / rewrite (the mask as a run-time input)."""

import numpy as np

from onnxzero.passes.rules.spatial import SpatialRule


def test_check_reasons(plain):
    model, site, _ = plain
    rule = SpatialRule(model)
    assert rule.check(site, {"patch": 5}) == "spatial patch 5 is not one of (2, 3, 4)"
    assert rule.check(site, {"patch": 2, "mask": np.ones((3, 3), np.uint8)}) == (
        "SpatialConv: input 'mask' has shape (3, 3), expected (p, p)=(2, 2), (K, p, p)=(8, 2, 2) or (K, OH, OW)=(8, 8, 8)")
    assert rule.check(site, {"patch": 2, "mask": np.full((2, 2), 2, np.uint8)}) == (
        "SpatialConv: input 'mask' has value 2 at flat index 0, expected 0 or 1")
    assert rule.check(site, {"patch": 2, "mask": np.ones((8, 2, 2), np.uint8)}) is None  # per filter
    assert rule.check(site, {"patch": 2, "mask": np.eye(2, dtype=np.uint8)}) is None


def test_default_is_the_diagonal(plain):
    model, site, _ = plain
    assert SpatialRule(model).default_setting(site, {}) == {"patch": 2, "mask": [[1, 0], [0, 1]]}


def test_calibrate_fits_nothing_and_rewrite_feeds_the_mask(plain):
    model, site, _ = plain
    rule = SpatialRule(model)
    assert rule.calibrate(site, {"patch": 2}, None) == {}
    mask = np.array([[1, 1], [0, 1]], np.uint8)
    rep = rule.rewrite(site, {"patch": 2, "mask": mask}, {}, "Y")
    (node,) = rep.nodes
    assert list(node.input) == ["xr", "W", "B", "conv__mask"]
    np.testing.assert_array_equal(rep.runtime_inputs["conv__mask"], mask)
    assert rep.setting == {"patch": 2, "mask_shape": [2, 2], "mask_ones": 0.75}
