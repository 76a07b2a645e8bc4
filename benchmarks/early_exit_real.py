"""EarlyExitConv exact mode on real activations: every Conv(+Add)+ReLU site of a zoo model, fed the
site inputs (and shortcut values) the model computes on real held-out MNIST digits.

    python benchmarks/early_exit_real.py [--model resnet-mnist] [--batch 1 8] [--images 64] [--runs 40]
    python benchmarks/early_exit_real.py --model resnet18-mnist --whole [--skip-zeros 2] [--runs 200]

Per site: exactness against onnxruntime's own Conv(+Add)+Relu (same zero set, non-zeros within 1e-5
relative), the skip rate from the op's `macs` counter (1 - macs / dense MACs), the ideal per-output
skip of the numpy reference (each output stops on its own, no zero input skipped) for comparison,
and the time ratio op / onnxruntime, interleaved in one process (A, B, A, B...), 2 intra-op threads,
no spinning, median of --runs.

--whole: the whole model instead, every eligible site rewritten with exact early exit (the rewrite
pass, --skip-zeros as the path), against the original: top-1 on all held-out digits (must be
unchanged), the share of site MACs the ops skipped (their own counters over the held-out digits),
and latency ratios at each --batch from the search's OrtMeasurer (interleaved, 2 threads, no
spinning, median of --runs pairs).
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
    ap.add_argument("--whole", action="store_true", help="the whole model rewritten vs the original")
    args = ap.parse_args()
    if args.whole:
        whole(args)
        return
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


def whole(args) -> None:
    import onnx

    from onnxzero.evaluate import Evaluator, top1
    from onnxzero.passes.rewrite import rewrite
    from onnxzero.search.latency import OrtMeasurer

    model = onnx.load(zoo_path(args.model))
    with np.load(zoo_path("mnist")) as z:
        x, y = z["inputs"].astype(np.float32), z["labels"]
    setting = {"technique": "early-exit", "mode": "exact"}
    if args.skip_zeros is not None:
        setting["skip_zeros"] = args.skip_zeros
    m, rep = rewrite(model, config={"default": setting}, runtime_settings=False)
    base, r = Evaluator(model).run(x), Evaluator(m).run(x)
    site_dense = sum(s.site.macs for s in rep.rewritten)  # per digit
    print(f"{args.model}: {len(rep.rewritten)} sites rewritten (exact, skip_zeros={args.skip_zeros}), {len(x)} digits")
    print(f"top-1 original {top1(base.logits, y):.4f}, rewritten {top1(r.logits, y):.4f}, "
          f"predictions equal on {np.mean(base.logits.argmax(1) == r.logits.argmax(1)):.2%}")
    print(f"site MACs per digit: dense {site_dense:.4g}, done {r.macs:.4g} (the ops' counters): "
          f"{1 - r.macs / site_dense:.1%} skipped")
    measurer = OrtMeasurer()
    for bsz in args.batch:
        ms, base_ms = measurer.compare(m, model, x[:bsz], runs=args.runs)
        print(f"batch {bsz}: {ms:.3f} ms vs {base_ms:.3f} ms original: x{ms / base_ms:.3f}")


if __name__ == "__main__":
    main()
