"""Each custom op vs onnxruntime's own Conv+Relu, same process, same thread count.

    python benchmarks/bench_ops.py [--json ops.json]    (same as `onnxzero bench ops`)
"""

import sys

from onnxzero.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "ops", *sys.argv[1:]])
