"""The optimize report: a terminal table and the JSON written by --report."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

# A final check whose ratio differs from the search's own figure for the same model by more than this
# factor (either way) is taken twice more; the median of the three decides.
RECHECK_FACTOR = 1.15


def _setting(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    keep = {k: v for k, v in s.items() if k not in ("mask",)}
    return json.dumps(keep, separators=(",", ":"))[:48]


def render(report: dict[str, Any], console: Console) -> None:
    b, o = report["baseline"], report.get("optimized")
    t = Table(title=f"onnxzero optimize: eps = {report['eps']:g} points, objective = {report['objective']}, "
                    f"validated on {report['split']['validation']} held-out samples")
    for col in ("", "top-1", "MACs / sample", f"latency (ms, batch {report.get('batch', 1)})"):
        t.add_column(col, justify="right")
    lat = f"{b['latency_ms']:.3f}" if b.get("latency_ms") is not None else "-"
    t.add_row("original", f"{b['accuracy'] * 100:.2f}%", f"{b['macs']:,}", lat)
    if o:
        t.add_row("optimized", f"{o['accuracy'] * 100:.2f}%", f"{o['macs']:,}", f"{o['latency_ms']:.3f}")
        t.add_row("change", f"{-report['validation_loss']:+.2f} pts", f"-{report['mac_reduction'] * 100:.1f}%",
                  f"x{report['latency_ratio']:.2f}")
    console.print(t)
    st = Table(title="sites")
    for col in ("site", "technique", "setting", "MACs before", "MACs after"):
        st.add_column(col, justify="right" if col.startswith("MACs") else "left", overflow="fold")
    for s in report["sites"]:
        st.add_row(s["node"], s["technique"] or "dense", _setting(s["setting"]), f"{s['macs_before']:,}", f"{s['macs_after']:,}")
    console.print(st)
    sr = report["search"]
    console.print(f"search: {sr['candidates_evaluated']} candidates measured ({sr['first_level']} first-level, "
                  f"{sr.get('latency_timed', 0)} timed in the whole model, {sr['combinations']} combinations) in {sr['seconds']:.0f} s; "
                  f"{len(report['pareto'])} points on the accuracy/MACs/latency Pareto front", highlight=False)
    d = report.get("decision") or {}
    if report["objective"] == "latency" and o:
        checks = d.get("final_ratios") or []
        console.print(f"final check: optimized x{d['final_ratio']:.3f} of the original, median of {d['final_runs']} "
                      f"interleaved runs each at batch {d['batch']}"
                      + (" (near the margin: the mean of two checks, " + " and ".join(f"x{v:.3f}" for v in checks) + ")"
                         if len(checks) == 2 else
                         " (unlike the search's figure: the median of three checks, "
                         + ", ".join(f"x{v:.3f}" for v in checks) + ")" if len(checks) == 3 else "")
                      + f"; written only if <= x{1 - d['margin']:.3f}", highlight=False)
    # the outcome itself (note, held-out back-off, no model) is printed by the caller, one line each



# ---- the report builder --------------------------------------------------------------------------
def build(*, o, engine, measurements, combiner, sites, site_dense: dict[str, int], base_macs: int, measured: dict,
          ranked: dict, hopeless: set, chains: set, split_sizes: tuple[int, int], labelled: bool,
          base_val_acc: float, x_val, ref_val, threads: int, held_out: tuple, t0: float):
    """(report, model to write or None, met_eps): the figures of the choice on the held-out split, the
    final interleaved latency check that has the last word (objective latency), and why it was decided."""
    import numpy as np

    from onnxzero.evaluate import Evaluator, top1
    from onnxzero.search.combine import choose
    from onnxzero.search.engine import macs_by_site, site_macs

    latency = o.objective == "latency"
    best, held_out_failures, val_cache = held_out
    combined = combiner.combined
    report: dict[str, Any] = {"eps": o.eps, "objective": o.objective, "mode": o.mode,
                              "techniques": list(o.techniques), "split": {"calibration": split_sizes[0], "validation": split_sizes[1]},
                              "labels": "labels" if labelled else "the float model's own top-1 (no labels given)",
                              "batch": o.batch}
    report["baseline"] = {"accuracy": base_val_acc, "macs": base_macs, "latency_ms": None}
    rewritten = combiner.rewritten()

    met_eps = best is not None
    if best is None:  # nothing held on held-out data (or nothing met eps on calibration)
        cands_all = [c for c in combined if id(c) in val_cache] or combined
        best = min(cands_all, key=lambda c: c.loss) if cands_all else None
    if held_out_failures:
        f = held_out_failures[0]
        report["held_out"] = (f"eps {o.eps:g} held on the calibration split (loss {f['calibration_loss']:.2f} pts) "
                              f"but not on the held-out split (loss {f['validation_loss']:.2f} pts)")
    report["held_out_backoffs"] = held_out_failures

    out_model = None
    best_rewritten = choose(rewritten, o.objective, o.tie) if rewritten else None
    # what the figures describe: the choice, or when the original won, the best rewrite found (for
    # the "best found" figure and --best-effort)
    target = best if best is not None and best.config else best_rewritten
    decision: dict[str, Any] = {"margin": o.margin, "final_runs": o.final_runs, "batch": o.batch,
                                "choice": "rewritten" if target is not None and target is best else "original"}
    if target is not None:
        if id(target) in val_cache:
            out_model, rep, r = val_cache[id(target)]
        else:
            out_model, rep = engine.deployed(target.config)
            r = Evaluator(out_model, threads=threads).run(x_val)
        macs = base_macs - sum(site_dense[s] for s in target.config) + site_macs(rep, r.site_macs)
        if latency:
            out_model = _chained_if_faster(out_model, measurements, o, decision)
        lat_opt, lat_base = measurements.compare(out_model, runs=o.final_runs)
        final_ratios = [lat_opt / lat_base]
        # Near the threshold one check is decided by the machine's drift (resnet18-mnist's 2-site
        # rewrite measured x0.93 in one run's final check and x0.99 in another's, minutes apart): a
        # second check at another moment, and the decision on the mean of the two.
        # A check that contradicts the search's own figure for this model by more than RECHECK_FACTOR
        # either way met a disturbance of the shared machine as often as a real difference (the same
        # resnet18-mnist rewrite: x0.65 in the search, x1.18 in one final check, x0.65-0.67 in three
        # later ones, and x1.02 once in between): two more checks, and the median of the three decides.
        disagree = latency and target.ratio > 0 and max(final_ratios[0] / target.ratio,
                                                        target.ratio / final_ratios[0]) > RECHECK_FACTOR
        if latency and (disagree or abs(final_ratios[0] - (1 - o.margin)) <= o.margin):
            bases = [lat_base]
            for _ in range(2 if disagree else 1):
                lat2, base2 = measurements.compare(out_model, runs=o.final_runs)
                final_ratios.append(lat2 / base2)
                bases.append(base2)
            lat_base = float(np.mean(bases))
            lat_opt = float(np.median(final_ratios) if disagree else np.mean(final_ratios)) * lat_base
        decision["final_ratios"] = final_ratios
        acc = top1(r.logits, ref_val)
        report["optimized"] = {"accuracy": acc, "macs": int(macs), "latency_ms": lat_opt}
        report["baseline"]["latency_ms"] = lat_base
        report["latency_ratio"] = lat_opt / lat_base
        report["mac_reduction"] = 1 - macs / base_macs
        report["validation_loss"] = 100.0 * (base_val_acc - acc)
        report["calibration_loss"] = target.loss
        by_site = macs_by_site(rep, r.site_macs)
        report["sites"] = [site_row(s, target.config.get(s.name), rep, by_site.get(s.name)) for s in sites]
        decision["final_ratio"] = lat_opt / lat_base
        faster = lat_opt <= (1 - o.margin) * lat_base
        # The final check (final_runs interleaved runs) outweighs the search's shorter measurements: a
        # rewrite within eps on both splits that it finds faster by the margin beats the original even
        # where the search's noisier figure had them tied.
        if latency and target is not best and met_eps and faster and report["validation_loss"] <= o.eps:
            best = target
            decision["choice"] = "rewritten"
        decision["written"] = bool(met_eps and target is best and (faster or not latency))
        decision["reason"] = ("faster than the original by at least the margin" if decision["written"] and latency else
                              "fewest MACs within eps" if decision["written"] else
                              "eps not met on held-out data" if not met_eps else
                              "the original is the fastest within eps" if target is not best else
                              "not faster than the original by the margin")
    else:
        report["optimized"] = None
        report["sites"] = [site_row(s, None, None) for s in sites]
        if combined:
            report["baseline"]["latency_ms"] = float(np.median([c.base_latency_ms for c in combined]))
        # no combination within eps: the fastest rewrite timed that met eps, or a probe that was no
        # faster than the original (it bounds what its settings could do, whatever their accuracy). A
        # faster probe whose settings all lost more than eps is not "found": citing it in "no faster
        # model within eps (best found x0.71)" said the opposite of the decision.
        single = [m.latency_ms / m.dense_latency_ms for m in measured.values()
                  if m.latency_ms is not None and m.dense_latency_ms and m.loss <= o.eps] + \
            [p for p in measurements.cache.probes.values() if p >= 1.0]
        decision["written"] = False
        decision["final_ratio"] = min(single) if single else None
        decision["reason"] = "the original is the fastest within eps" if latency else "no configuration met eps"
    if latency and not decision["written"] and met_eps:
        fr = decision["final_ratio"]
        report["note"] = (f"no faster model within eps {o.eps:g}: the original is the fastest on this machine "
                          + (f"(best found x{fr:.2f})" if fr is not None else "(no rewrite within eps sped the whole model up)"))
    if not latency and not ranked:
        report["note"] = (f"no site setting saved {o.objective} within eps on its own: "
                          "the original model is the best this search found")
    report["decision"] = decision
    report["met_eps"] = met_eps
    report["search"] = {"candidates_evaluated": len(measured) + len(combined), "first_level": len(measured),
                        "latency_timed": measurements.timed, "probes": len(measurements.cache.probes),
                        "hopeless": sorted(f"{s}|{t}" for s, t in hopeless), "chains": sorted(chains),
                        "combinations": len(combined),
                        "seconds": time.time() - t0}
    base_lat = report["baseline"]["latency_ms"] or 0.0
    report["pareto"] = pareto([{"accuracy": engine.base_accuracy, "macs": base_macs, "latency_ms": base_lat, "label": "float model"}]
                              + [{"accuracy": engine.base_accuracy - c.loss / 100, "macs": c.macs,
                                  "latency_ms": c.ratio * base_lat, "label": f"{len(c.config)} sites"} for c in combined])
    return report, out_model, met_eps


def site_row(s, cfg: dict[str, Any] | None, rep, macs_after: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"node": s.name, "technique": None, "setting": None, "macs_before": int(s.macs or 0),
                           "macs_after": int(s.macs or 0) if macs_after is None else int(macs_after)}
    if cfg and rep is not None:
        r = next(x for x in rep.sites if x.site.name == s.name)
        row.update(technique=cfg["technique"], setting=r.to_json()["setting"], stats=r.to_json()["stats"])
    return row


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated in (higher accuracy, lower MACs, lower latency)."""
    def dominated(p, q):
        return (q["accuracy"] >= p["accuracy"] and q["macs"] <= p["macs"] and q["latency_ms"] <= p["latency_ms"]
                and (q["accuracy"], q["macs"], q["latency_ms"]) != (p["accuracy"], p["macs"], p["latency_ms"]))
    return [p for p in points if not any(dominated(p, q) for q in points)]


def _chained_if_faster(model, measurements, o, decision: dict[str, Any]):
    """The model with whole chains of onnxzero ops (passes/chain_layout.apply_chains: the Convs next to
    our ops become ConvRelu and tensors between them stay blocked) when that times faster against the
    original than the model as rewritten; else the model itself. Decided on the search's shorter
    measurements, so the final check that follows times only the chosen model and its figure carries no
    winner's bias. The two compute the same up to float rounding, so accuracy and MACs stand."""
    from onnxzero.passes.chain_layout import apply_chains

    chained, rep = apply_chains(model)
    if not rep["converted"] and not rep["blocked"]:
        return model
    lat_c, base_c = measurements.compare(chained, runs=o.latency_runs)
    lat_m, base_m = measurements.compare(model, runs=o.latency_runs)
    use = lat_c / base_c < lat_m / base_m
    decision["chains"] = {"converted": len(rep["converted"]), "blocked": len(rep["blocked"]),
                          "ratio_chained": lat_c / base_c, "ratio_unchained": lat_m / base_m, "used": use}
    return chained if use else model
