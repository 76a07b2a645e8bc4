"""One rewrite rule per technique, each in its own file.

Every rule matches the same pattern, a Conv+ReLU site (Conv -> Relu, or Conv -> Clip(0, max)),
which onnxzero.passes.sites finds once for all of them; a rule adds its `check` (a reason it must
not fire on this site, or None) and its `rewrite` (the nodes and initializers that replace the
site). We do not use onnxscript's pattern rewriter here because every site carries its own setting
and calibration data, and the site finder already proved the pattern (with the reasons a Conv is
not a site); the rewriter stays the tool for the stateless folds in normalize.
"""

from onnxzero.passes.rules.base import Calibration, Replacement, SiteRule
from onnxzero.passes.rules.early_exit import EarlyExitRule
from onnxzero.passes.rules.lazy import LazyRule
from onnxzero.passes.rules.sparse_quant import SparseQuantRule
from onnxzero.passes.rules.spatial import SpatialRule

RULES: dict[str, type[SiteRule]] = {r.technique: r for r in (SpatialRule, EarlyExitRule, LazyRule, SparseQuantRule)}
TECHNIQUES = tuple(RULES)

__all__ = ["RULES", "TECHNIQUES", "Calibration", "Replacement", "SiteRule"]
