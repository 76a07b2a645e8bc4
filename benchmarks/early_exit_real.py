"""EarlyExitConv exact mode on real activations: every Conv(+Add)+ReLU site of a zoo model, fed the
site inputs (and shortcut values) the model computes on real held-out MNIST digits.

    python benchmarks/early_exit_real.py [--model resnet-mnist] [--batch 1 8] [--images 64] [--runs 40]

Per site: exactness against onnxruntime's own Conv(+Add)+Relu (same zero set, non-zeros within 1e-5
relative), the skip rate from the op's `macs` counter (1 - macs / dense MACs), the ideal per-output
skip of the numpy reference (each output stops on its own, no zero input skipped) for comparison,
and the time ratio op / onnxruntime, interleaved in one process (A, B, A, B...), 2 intra-op threads,
no spinning, median of --runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxzero.bench.op_early_exit import capture, conv_sites, site_models
from onnxzero.load import load_model
from onnxzero.ops import early_exit as ee
from onnxzero.ops import make_session
from onnxzero.passes.normalize import normalize
from onnxzero.zoo import path as zoo_path


def interleaved(sa, fa, sb, fb, runs: int) -> tuple[float, float]:
    for _ in range(3):
        sa.run(None, fa), sb.run(None, fb)
    ta, tb = [], []
    for _ in range(runs):
        t0 = time.perf_counter(); sa.run(None, fa); t1 = time.perf_counter()
        sb.run(None, fb); t2 = time.perf_counter()
        ta.append(t1 - t0), tb.append(t2 - t1)
    return float(np.median(ta)), float(np.median(tb))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet-mnist")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--ideal", action="store_true", help="also the numpy reference's per-output skip (slow)")
    ap.add_argument("--skip-zeros", type=int, default=None, choices=[-1, 0, 1, 2],
                    help="exact path: 1 sparse, 2 stop, 0 dense, default: the kernel's cost model")
    args = ap.parse_args()
    model, _ = normalize(load_model(f"zoo:{args.model}"))
    data = np.load(zoo_path("mnist"))["inputs"][: args.images].astype(np.float32)
    sites = conv_sites(model)
    acts = capture(model, sites, data)
    sites = [s for s in sites if np.all(acts[s["x"]] >= 0)]  # exact mode needs a non-negative input
    tot_dense = tot_done = 0
    print(f"{args.model}: {len(sites)} sites with a non-negative input, {len(data)} digits")
    print(f"{'site':34} {'res':3} {'x=0':>5} {'skip':>6} {'ideal':>6} " + " ".join(f"{'b' + str(b):>12}" for b in args.batch))
    for s in sites:
        x = acts[s["x"]]
        o = acts[s["other"]] if s["other"] else None
        op, ref = site_models(s, x.shape, args.skip_zeros)
        so, sr = make_session(op, threads=2), make_session(ref, threads=2, library=False)
        feeds = {"X": x} | ({"O": o} if o is not None else {})
        y, macs = so.run(None, feeds)
        (y_ref,) = sr.run(None, feeds)
        scale = max(1.0, float(np.abs(y_ref).max()))
        near = np.abs(y_ref) <= 1e-6 * scale
        same_zeros = np.array_equal((y == 0)[~near], (y_ref == 0)[~near])
        close = np.allclose(y, y_ref, rtol=1e-5, atol=2e-6 * scale)
        K, cg, kh, kw = s["w"].shape
        dense = y.shape[0] * y.shape[2] * y.shape[3] * np.count_nonzero(s["w"])
        tot_dense += dense
        tot_done += int(macs)
        ideal = ""
        if args.ideal:
            _, macs_ideal = ee.reference(x[:8], s["w"], s["b"], other=None if o is None else o[:8], snapea_count=True, **s["conv"])
            ideal = f"{1 - macs_ideal / (dense * 8 / len(x)):6.1%}"
        cells = []
        for bsz in args.batch:
            fb = {k: v[:bsz] for k, v in feeds.items()}
            ta, tb = interleaved(so, fb, sr, fb, args.runs)
            cells.append(f"{ta * 1e3:6.3f}/{ta / tb:4.2f}x")
        flag = "" if same_zeros and close else "  NOT EXACT"
        print(f"{s['name'][:34]:34} {'yes' if o is not None else '':3} {np.mean(x == 0):5.0%} {1 - int(macs) / dense:6.1%} "
              f"{ideal:>6} " + " ".join(f"{c:>12}" for c in cells) + flag)
    print(f"all sites: {1 - tot_done / tot_dense:.1%} of (nonzero-weight) MACs skipped")


if __name__ == "__main__":
    main()
