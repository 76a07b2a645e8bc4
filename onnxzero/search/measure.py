"""The search's measurer: accuracy and MACs of candidates and combinations (on this process's Engine,
or on Ray workers), whole-model latency (only ever here), and the resume cache that keeps them,
keyed by model, data, split and options.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxzero.emit import atomic_write_json
from onnxzero.search.candidates import Candidate, aggressiveness, site_config
from onnxzero.search.combine import Combined
from onnxzero.search.engine import Engine, Measured
from onnxzero.search.latency import Measurer

if TYPE_CHECKING:
    from onnxzero.search.cluster import RemotePool
    from onnxzero.search.greedy import Progress, SearchOptions

CACHE_VERSION = 3  # 3: sparse-quant prunes by OBS with calibration data


# ---- the resume cache ---------------------------------------------------------------------------
def cache_key(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray | None, cal: np.ndarray,
              options: "SearchOptions") -> str:
    """What the cached figures depend on: model, data, split and the options (not --jobs)."""
    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True))
    for a in (np.ascontiguousarray(inputs), labels, cal):
        if a is not None:
            h.update(str((a.dtype, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    opts = {k: v for k, v in asdict(options).items() if k != "jobs"}
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    return h.hexdigest()


_MEASURED_FIELDS = {f.name for f in fields(Measured)}
_REQUIRED = {"key", "site", "technique", "setting", "accuracy", "loss", "macs", "dense_macs"}


def load_cache(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """(cache, "") when `path` holds this run's cache, else (None, why not) for a one-line note."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"it is not readable JSON ({type(e).__name__})"
    if not isinstance(data, dict) or set(data) != {"version", "key", "probes", "measured", "combined"}:
        return None, "it is not a search cache (expected keys version, key, probes, measured, combined)"
    if data["version"] != CACHE_VERSION:
        return None, f"it is cache version {data['version']!r}, expected {CACHE_VERSION}"
    if data["key"] != key:
        return None, "it was made for another model, data, split or options"
    if not isinstance(data["measured"], dict) or not isinstance(data["combined"], list) or not isinstance(data["probes"], dict) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data["probes"].values()):
        return None, "its 'probes', 'measured' or 'combined' entry has the wrong type"
    for k, v in data["measured"].items():
        if not (isinstance(v, dict) and _REQUIRED <= set(v) <= _MEASURED_FIELDS and v["key"] == k
                and all(isinstance(v[f], (int, float)) and not isinstance(v[f], bool) for f in ("accuracy", "loss", "macs", "dense_macs"))
                and all(v.get(f) is None or isinstance(v[f], (int, float)) for f in ("latency_ms", "dense_latency_ms"))):
            return None, f"its entry {k[:60]!r} is malformed"
    return data, ""


class Cache:
    """What an interrupted search keeps: first-level measurements, latency probes, combinations."""

    def __init__(self, path: Path | None, key: str):
        self.path = path
        self.data: dict[str, Any] = {"version": CACHE_VERSION, "key": key, "probes": {}, "measured": {}, "combined": []}

    def resume(self, progress: "Progress") -> None:
        if not (self.path and self.path.exists()):
            return
        loaded, why = load_cache(self.path, self.data["key"])
        if loaded is None:
            progress.note(f"--resume: ignored {self.path}: {why}; starting afresh")
        else:
            self.data = loaded
            probes = f" and {len(self.probes)} latency probes" if self.probes else ""
            progress.note(f"resumed {len(self.measured)} measured candidates{probes} from {self.path}")

    @property
    def measured(self) -> dict[str, Any]:
        return self.data["measured"]

    @property
    def probes(self) -> dict[str, float]:
        return self.data["probes"]

    @property
    def combined(self) -> list[dict[str, Any]]:
        return self.data["combined"]

    def save(self) -> None:
        if self.path:
            atomic_write_json(self.path, self.data)


# ---- the measurer -------------------------------------------------------------------------------
class Measurements:
    """Every figure the search decides on, each through the cache: accuracy and MACs from `engine` (or
    from Ray workers, `remote`), latency from `measurer` comparing whole models with the original `base`."""

    def __init__(self, engine: Engine, measurer: Measurer, base: onnx.ModelProto, sample: np.ndarray,
                 options: "SearchOptions", cache: Cache, progress: "Progress", remote: "RemotePool | None" = None):
        self.engine, self.measurer, self.base, self.sample = engine, measurer, base, sample
        self.o, self.cache, self.progress, self.remote = options, cache, progress, remote
        self.timed = 0

    def compare(self, model: onnx.ModelProto, runs: int | None = None) -> tuple[float, float]:
        return self.measurer.compare(model, self.base, self.sample, runs=runs or self.o.latency_runs)

    # -- 0. latency probes ------------------------------------------------------------------------
    def probe(self, cands: list[Candidate], base_macs: int) -> tuple[set[tuple[str, str]], set[str]]:
        """((site, technique) pairs that cannot speed the whole model up, techniques that pay as a chain),
        found before any accuracy run.

        A latency run at batch 1 costs far less than an accuracy run over the calibration split, so each
        pair's most aggressive setting is timed in the whole model first: when even it is no faster than
        the original, its gentler settings (which skip less) are never measured. A site whose share of
        the model's MACs is below min_share is not even timed: it cannot make a difference. Each technique
        is also timed with every site at its boldest setting: where that saves more than its sites alone
        add up to (onnxruntime reorders only at a chain's edges), the technique pays as a chain: its
        sites stay in the search and it seeds the network level on every site."""
        o, cache, progress = self.o, self.cache, self.progress
        groups: dict[tuple[str, str], list[Candidate]] = {}
        for c in cands:
            groups.setdefault((c.site, c.technique), []).append(c)
        hopeless, small, boldest = set(), set(), {}
        techniques = sorted({t for _, t in groups})

        def probe(key: str, config: dict[str, dict[str, Any]]) -> float:
            if key not in cache.probes:
                model, _ = self.engine.deployed(config)
                lat, b = self.compare(model)
                cache.probes[key] = lat / b
            return cache.probes[key]

        progress.start(len(groups) + len(techniques), "whole-model latency of each site's boldest setting")
        try:
            for (site, t), cs in groups.items():
                if self.engine.sites[site].macs / base_macs < o.min_share:
                    small.add((site, t))
                else:
                    p = boldest[(site, t)] = max(cs, key=aggressiveness)
                    if probe(p.key, {site: site_config(p)}) > 1 - o.tie:
                        hopeless.add((site, t))
                progress.advance()
            chains = set()
            for t in techniques:
                ps = [p for (_, pt), p in boldest.items() if pt == t]
                if len(ps) < 2:
                    progress.advance()
                    continue
                # a chain pays when every site at once saves more than the sites alone add up to: its
                # ops then pass blocked tensors to each other, the reorders fall away
                chain = probe(f"chain|{t}", {p.site: site_config(p) for p in ps})
                alone = sum(max(0.0, 1.0 - cache.probes[p.key]) for p in ps)
                if 1.0 - chain > alone + o.tie:
                    chains.add(t)
                    hopeless -= {(p.site, t) for p in ps}
                progress.advance()
        except KeyboardInterrupt:
            cache.save()
            raise
        cache.save()
        return hopeless | small, chains

    # -- 1. first level: accuracy and MACs ----------------------------------------------------------
    def first_level(self, cands: list[Candidate]) -> dict[str, Measured]:
        """Accuracy and MACs on the calibration split (only the candidate's site changed) of the
        candidates the search can use, boldest first.

        Per site and technique (and early-exit mode) the settings are measured from the boldest down, one aggressiveness
        level at a time, until `top_m` of them are within eps: a gentler setting skips less work, so
        the network level, which takes each site's top_m boldest options within eps (best saving
        first), would never reach it. Each round measures the next level of every unfinished (site,
        technique) at once (on Ray workers or --jobs threads; serially, in the same order)."""
        cache, progress, o = self.cache, self.progress, self.o
        groups: dict[tuple, list[list[Candidate]]] = {}
        for c in cands:
            # exact early exit loses nothing and predicts nothing: a group of its own, always measured
            groups.setdefault((c.site, c.technique, c.setting.get("mode")), []).append(c)
        for k, cs in groups.items():
            levels: dict[float, list[Candidate]] = {}
            for c in cs:
                levels.setdefault(aggressiveness(c), []).append(c)
            groups[k] = [levels[a] for a in sorted(levels, reverse=True)]
        progress.start(len(cands), "first-level candidates")
        done: dict[str, Measured] = {}
        within, fresh = dict.fromkeys(groups, 0), 0
        try:
            while groups:
                batch = [c for levels in groups.values() for c in levels[0]]
                todo = [c for c in batch if c.key not in cache.measured]
                progress.advance(len(batch) - len(todo))
                for m in self._measure(todo):
                    cache.measured[m.key] = m.to_json()
                    progress.advance()
                    fresh += 1
                    if fresh % 10 == 0:  # what an interrupted search keeps
                        cache.save()
                for k in list(groups):
                    level = groups[k].pop(0)
                    for c in level:
                        done[c.key] = Measured(**cache.measured[c.key])
                        within[k] += done[c.key].loss <= o.eps
                    if within[k] >= o.top_m or not groups[k]:
                        progress.advance(sum(len(lv) for lv in groups.pop(k)))
        except KeyboardInterrupt:
            cache.save()
            raise
        cache.save()
        return {c.key: done[c.key] for c in cands if c.key in done}

    def _measure(self, todo: list[Candidate]):
        """Each candidate's Measured, in order: on Ray workers, --jobs threads, or here."""
        if self.remote is not None:
            for m in self.remote.measure(todo):
                m.loss = 100.0 * (self.engine.base_accuracy - m.accuracy)  # against the driver's own float model
                yield m
        elif self.o.jobs > 1:
            with ThreadPoolExecutor(self.o.jobs) as pool:
                yield from pool.map(self.engine.measure, todo)
        else:
            for c in todo:
                yield self.engine.measure(c)

    # -- 1b. whole-model latency of the candidates that can still win -------------------------------
    def time_first_level(self, measured: dict[str, Measured], cand_by_key: dict[str, Candidate], base_macs: int) -> None:
        """Per site and technique, the most aggressive settings within eps timed in the whole model,
        until one buys no time (a gentler one skips less) or top_m do."""
        o, cache, progress = self.o, self.cache, self.progress

        def time_one(m: Measured) -> None:
            if m.latency_ms is None:
                model_c, _ = self.engine.deployed({m.site: site_config(cand_by_key[m.key])})
                m.latency_ms, m.dense_latency_ms = self.compare(model_c)
                cache.measured[m.key] = m.to_json()
                self.timed += 1

        groups: dict[tuple[str, str], list[Measured]] = {}
        for m in measured.values():
            if m.loss <= o.eps and m.macs < m.dense_macs:
                groups.setdefault((m.site, m.technique), []).append(m)
        progress.start(len(groups), "whole-model latency per site and technique")
        try:
            for (site, _t), ms in groups.items():
                ms.sort(key=lambda m: (m.macs, m.loss))  # most aggressive first
                # upper bound: a site's rewrite can save at most its share of the work it skips
                if (ms[0].dense_macs - ms[0].macs) / base_macs < o.min_share:
                    progress.advance()
                    continue
                fast = 0
                for m in ms:
                    time_one(m)
                    if m.saved("latency") <= o.tie:
                        break  # a gentler setting skips less: it will not buy time either
                    fast += 1
                    if fast >= o.top_m:
                        break
                progress.advance()
                cache.save()
        except KeyboardInterrupt:
            cache.save()
            raise

    # -- 3. network-level combinations -------------------------------------------------------------
    def combination(self, cfg: dict[str, dict[str, Any]], base_macs: int, site_dense: dict[str, int]) -> Combined:
        """Accuracy, MACs (and with objective latency, whole-model latency) of `cfg` as deployed."""
        latency = self.o.objective == "latency"
        # accuracy and MACs on a Ray worker when there is one; latency always here, on the driver
        model, acc, op_macs = self.remote.combination(cfg, latency) if self.remote is not None \
            else self.engine.combination(cfg)
        return self._combined(cfg, model, acc, op_macs, base_macs, site_dense)

    def combinations(self, cfgs: list[dict[str, dict[str, Any]]], base_macs: int,
                     site_dense: dict[str, int]) -> list[Combined]:
        """Several combinations' accuracy and MACs at once on the Ray workers; then, with no Ray task
        of this search running, each one's latency here."""
        latency = self.o.objective == "latency"
        figures = self.remote.combinations(cfgs, latency)
        return [self._combined(cfg, *f, base_macs, site_dense) for cfg, f in zip(cfgs, figures)]

    def _combined(self, cfg, model, acc: float, op_macs: int, base_macs: int, site_dense: dict[str, int]) -> Combined:
        latency = self.o.objective == "latency"
        macs = base_macs - sum(site_dense[s] for s in cfg) + op_macs
        lat, base_lat = self.compare(model) if latency else (1.0, 1.0)
        return Combined(config=cfg, accuracy=acc, loss=100.0 * (self.engine.base_accuracy - acc), macs=int(macs),
                        latency_ms=lat, base_latency_ms=base_lat)
