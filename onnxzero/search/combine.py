"""The search's combiner: per-site options ranked, seeds for the network level, the network level with
back-off (Appendix 1's iterative scheme), and the decision among the combinations that meet eps,
held to the validation split the search never saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxzero.evaluate import Evaluator, top1
from onnxzero.emit import jsonable
from onnxzero.passes.sites import Site
from onnxzero.search.candidates import Candidate, site_config
from onnxzero.search.engine import Engine, Measured

if TYPE_CHECKING:
    from onnxzero.search.greedy import Progress, SearchOptions


@dataclass
class Combined:
    config: dict[str, dict[str, Any]]  # site -> {"technique", setting...}; {} is the original model
    accuracy: float
    loss: float
    macs: int
    latency_ms: float
    base_latency_ms: float  # the original, interleaved with it in the same measurement

    @property
    def ratio(self) -> float:
        return self.latency_ms / self.base_latency_ms if self.base_latency_ms else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"config": jsonable(self.config), "accuracy": self.accuracy, "loss": self.loss, "macs": self.macs,
                "latency_ms": self.latency_ms, "base_latency_ms": self.base_latency_ms, "ratio": self.ratio}


def choose(combos: list[Combined], objective: str, tie: float) -> Combined:
    """The fastest (or fewest-MACs) combination; among ties the smaller accuracy loss."""
    if objective == "macs":
        return min(combos, key=lambda c: (c.macs, c.loss))
    fastest = min(c.ratio for c in combos)
    near = [c for c in combos if c.ratio <= fastest * (1 + tie)]
    return min(near, key=lambda c: (c.loss, c.ratio, len(c.config)))


def rank(measured: dict[str, Measured], sites: list[Site], o: "SearchOptions") -> dict[str, list[Measured]]:
    """Per site, the options within eps that buy time (latency) or MACs, best first."""
    latency = o.objective == "latency"
    ranked: dict[str, list[Measured]] = {}
    for s in sites:
        ok = [m for m in measured.values() if m.site == s.name and m.loss <= o.eps
              and m.saved(o.objective) > (o.tie if latency else 0)]
        ok.sort(key=lambda m: (-m.saved(o.objective), m.loss))
        if ok:
            ranked[s.name] = ok
    return ranked


def seeds(ranked: dict[str, list[Measured]], measured: dict[str, Measured], sites: list[Site], chains: set[str],
          o: "SearchOptions") -> list[dict[str, list[Measured]]]:
    """Starting points of the network level: the best options over all techniques, and, when several are
    enabled, each technique's own best options (a site's single best choice can combine worse than a
    uniform technique; we want the fastest passing model, not the first)."""
    out = [{s: ms[:o.top_m] for s, ms in ranked.items()}] if ranked else []
    if len(o.techniques) > 1:
        for t in o.techniques:
            seed = {s: [m for m in ms if m.technique == t][:o.top_m] for s, ms in ranked.items()}
            seed = {s: v for s, v in seed.items() if v}
            if seed and seed not in out:
                out.append(seed)
    # A technique that pays only as a chain (its ops next to each other, no reorders between them)
    # shows no gain site by site: seed it on every site, ranked by the MACs its settings skip.
    for t in sorted(chains):
        seed = {}
        for s in sites:
            ms = sorted((m for m in measured.values() if m.site == s.name and m.technique == t
                         and m.loss <= o.eps and m.macs < m.dense_macs), key=lambda m: (m.macs, m.loss))
            if ms:
                seed[s.name] = ms[:o.top_m]
        if seed and seed not in out:
            out.append(seed)
    return out


def _key(cfg: dict[str, dict[str, Any]]) -> str:
    return json.dumps(jsonable(cfg), sort_keys=True)


def site_loss(measured: dict[str, Measured], cfg: dict[str, Any], site: str, cands: dict[str, Candidate]) -> float:
    """The first-level loss of the option `cfg` at `site` (0 when it was not measured alone)."""
    for m in measured.values():
        if m.site == site and site_config(cands[m.key]) == cfg:
            return m.loss
    return 0.0


class Combiner:
    """Network-level combinations, each measured once (`measure(cfg)`), and the decision among them."""

    def __init__(self, measure: Callable[[dict[str, dict[str, Any]]], Combined], original: Combined,
                 o: "SearchOptions", cache_entries: list[dict[str, Any]], progress: "Progress"):
        self.measure, self.original, self.o = measure, original, o
        self.cache_entries, self.progress = cache_entries, progress
        self.latency = o.objective == "latency"
        self.combined: list[Combined] = []
        self.seen: dict[str, Combined] = {}
        self.rejected: set[int] = set()  # combinations that did not hold on the held-out split

    def evaluate(self, cfg: dict[str, dict[str, Any]]) -> Combined:
        if not cfg:
            return self.original
        k = _key(cfg)
        if k not in self.seen:
            self._record(k, self.measure(cfg))
            self.progress.advance()
        return self.seen[k]

    def _record(self, k: str, c: Combined) -> None:
        self.seen[k] = c
        self.combined.append(c)
        self.cache_entries.append(c.to_json())

    def _walk(self, options_by_site: dict[str, list[Measured]], cand_by_key: dict[str, Candidate]):
        """One seed's back-off walk: yields a combination, is sent its figures, yields the next."""
        o = self.o
        choice = {s: 0 for s in options_by_site}
        for _ in range(o.max_rounds):
            if not choice:
                return
            c = yield {s: site_config(cand_by_key[options_by_site[s][i].key]) for s, i in choice.items()}
            if c.loss <= o.eps:
                return
            # back off the site whose current option costs the most accuracy on its own; while the
            # first-level losses given back so far cover less than the overshoot, the next worst too
            # (losses roughly add up: a seed over all sites then needs a few steps, not one per site)
            over, given, first = c.loss - o.eps, 0.0, True
            for worst in sorted(choice, key=lambda s: (-options_by_site[s][choice[s]].loss,
                                                       options_by_site[s][choice[s]].saved(o.objective))):
                now = options_by_site[worst][choice[worst]].loss
                if not first and (given >= over or now <= 0):
                    break
                first = False
                choice[worst] += 1
                if choice[worst] >= len(options_by_site[worst]):
                    del choice[worst]
                    given += max(now, 0.0)
                else:
                    given += max(now - options_by_site[worst][choice[worst]].loss, 0.0)
                if given <= 0:
                    break  # no first-level loss to go by: one site a step, as the paper does

    def network_level(self, seeds: list[dict[str, list[Measured]]], cand_by_key: dict[str, Candidate],
                      measure_many: Callable[[list[dict[str, dict[str, Any]]]], list[Combined]] | None = None) -> None:
        """From each seed, every site takes its best option; while the combination loses more than eps,
        the site whose option costs the most accuracy backs off to its next option, or to dense (and
        the next worst too, while the first-level losses given back cover less than the overshoot).

        With `measure_many` (Ray workers) the seeds' walks advance side by side: a walk's next step
        depends only on its own last combination, so each round's new combinations are measured at
        once; they are then recorded in the order the walks one after the other find them, so the
        decision is the one the serial search makes."""
        self.progress.start(self.o.max_rounds * len(seeds), "network-level combinations")
        walks = [self._walk(seed, cand_by_key) for seed in seeds]
        if measure_many is None:
            for w in walks:
                cfg = next(w, None)
                while cfg is not None:
                    try:
                        cfg = w.send(self.evaluate(cfg))
                    except StopIteration:
                        cfg = None
            return
        found: dict[str, Combined] = {}
        trails: list[list[str]] = [[] for _ in walks]
        current = {i: cfg for i, w in enumerate(walks) if (cfg := next(w, None)) is not None}
        while current:
            new = {}
            for cfg in current.values():
                k = _key(cfg)
                if k not in found and k not in new:
                    new[k] = cfg
            for k, c in zip(new, measure_many(list(new.values()))):
                found[k] = c
                self.progress.advance()
            step = {}
            for i, cfg in current.items():
                k = _key(cfg)
                trails[i].append(k)
                try:
                    step[i] = walks[i].send(found[k])
                except StopIteration:
                    pass
            current = step
        for trail in trails:
            for k in trail:
                if k not in self.seen:
                    self._record(k, found[k])

    def pool(self) -> list[Combined]:
        return [c for c in self.combined if c.loss <= self.o.eps and id(c) not in self.rejected] + \
            ([self.original] if self.latency else [])

    def decide(self, measured: dict[str, Measured], cand_by_key: dict[str, Candidate]) -> Combined:
        o = self.o
        rw = [c for c in self.pool() if c.config]
        if self.latency and rw:
            # a site whose rewrite buys no whole-model time goes back to the original
            c = choose(rw, o.objective, o.tie)
            for s in sorted(c.config, key=lambda s: -site_loss(measured, c.config[s], s, cand_by_key)):
                d = self.evaluate({k: v for k, v in c.config.items() if k != s})
                if d.loss <= o.eps and id(d) not in self.rejected and d.ratio <= c.ratio * (1 + o.tie):
                    c = d
        return choose(self.pool(), o.objective, o.tie)

    def hold_out(self, engine: Engine, x_val: np.ndarray, ref_val: np.ndarray, base_val_acc: float, threads: int,
                 measured: dict[str, Measured], cand_by_key: dict[str, Candidate]):
        """The choice must hold on data the search never saw: back off to the next choice until it does.
        (best or None, held-out failures, id(combination) -> (model, rewrite report, validation run))."""
        best, failures = None, []
        val_cache: dict[int, tuple[Any, Any, Any]] = {}
        while self.pool() and len(failures) < 8:
            cand = self.decide(measured, cand_by_key)
            if not cand.config:
                best = cand
                break
            out_model, rep = engine.deployed(cand.config)
            r = Evaluator(out_model, threads=threads).run(x_val)
            vloss = 100.0 * (base_val_acc - top1(r.logits, ref_val))
            val_cache[id(cand)] = (out_model, rep, r)
            if vloss <= self.o.eps:
                best = cand
                break
            failures.append({"sites": len(cand.config), "calibration_loss": cand.loss, "validation_loss": vloss})
            self.rejected.add(id(cand))
        return best, failures, val_cache

    def rewritten(self) -> list[Combined]:
        """The combinations within eps that held (or were not tried) on the held-out split."""
        return [c for c in self.combined if c.loss <= self.o.eps and id(c) not in self.rejected]
