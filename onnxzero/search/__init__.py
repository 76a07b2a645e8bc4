"""Search: the greedy optimizer behind `onnxzero optimize` (spatial-prediction paper, section 5 and
Appendix 1), generalized so every Conv+ReLU site may take any enabled technique and setting."""

from onnxzero.search.greedy import OptimizeResult, SearchOptions, optimize

__all__ = ["OptimizeResult", "SearchOptions", "optimize"]
