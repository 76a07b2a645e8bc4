"""Rewrite: replace a model's Conv+ReLU sites with onnxzero's custom ops.

load -> normalize -> find sites -> rewrite (this module) -> evaluate -> search -> emit.

`rewrite(model, technique=..., config=..., data=...)` normalizes the model, finds its sites,
lets each site's technique rule check and rewrite it, and returns a model that passes
onnx.checker's full check, keeps the graph's input and output names and shapes, runs in
onnxruntime with the library registered, and records its provenance (onnxzero version and every
site's setting) in metadata_props. Settings that may change per run (lazy ratios, spatial
masks, predictive thresholds) become graph inputs with default values, so a deployment or the
optimizer can move them without editing the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxzero import DOMAIN, OP_VERSION, UserError
from onnxzero.emit import METADATA_KEY, jsonable, provenance, set_provenance  # noqa: F401 - re-exported
from onnxzero.evaluate import macs_output_name
from onnxzero.ops.spec import OPS
from onnxzero.passes.normalize import normalize_ir, run_passes
from onnxzero.passes.rules import RULES, TECHNIQUES, Calibration, Replacement, SiteRule
from onnxzero.passes.sites import ConvVerdict, FindSitesPass, Site, explain

PASS = "rewrite"


@dataclass
class SiteResult:
    site: Site
    technique: str | None  # None: left as Conv+ReLU
    setting: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it was not rewritten
    # where the site's op is in the rewritten model, so nobody has to find it by name: its node name,
    # its output Y, its MAC counter's output (as evaluate.expose_macs names it) and its run-time
    # settings (spec input name -> graph input name)
    op: str | None = None
    y: str | None = None
    macs_output: str | None = None
    settings: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.site.name, "technique": self.technique, "setting": self.setting,
                "macs": self.site.macs, "stats": jsonable(self.stats), "reason": self.reason}


@dataclass
class RewriteReport:
    verdicts: list[ConvVerdict]
    sites: list[SiteResult]

    @property
    def rewritten(self) -> list[SiteResult]:
        return [s for s in self.sites if s.technique]

    def sparse_quant_total(self) -> dict[str, float] | None:
        """Model-level %W_Z and CR over the sparse-quant sites (the pruning paper's Table II total)."""
        rows = [s.stats for s in self.rewritten if s.technique == "sparse-quant" and "weights" in s.stats]
        weights = sum(r["weights"] for r in rows)
        if not weights:
            return None
        pct = 100.0 * sum(r["entries"] for r in rows) / weights
        return {"%W_Z": pct, "CR": 100.0 / (pct * (8 + 8) / 32) if pct else float("inf"), "weights": weights}

    def explain_lines(self) -> list[str]:
        """Every Conv: the site it became (and what happened to it) or why it is not one."""
        by_conv = {s.site.name: s for s in self.sites}
        lines = []
        for v in self.verdicts:
            s = by_conv.get(v.conv)
            if s is None:
                lines.append(v.line())
            elif s.technique:
                lines.append(f"{v.line()}\n    -> rewritten: {s.technique} {json.dumps(jsonable(s.setting))}")
            else:
                lines.append(f"{v.line()}\n    -> kept: {s.reason}")
        return lines


def parse_config(config: Mapping[str, Any] | None, technique: str | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """({default setting}, {site: setting}) from a config mapping.

    Config JSON: {"technique": "lazy", "default": {"ratio": 0.5}, "sites": {"conv1": {"ratio": 0.9},
    "conv2": {"technique": "early-exit", "mode": "exact"}, "conv3": null}} — null leaves a site alone.
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise UserError(f"{PASS}: config is a {type(config).__name__}, expected a JSON object")
    config = dict(config)
    unknown = set(config) - {"technique", "default", "sites"}
    if unknown:
        raise UserError(f"{PASS}: config has unknown key {sorted(unknown)[0]!r}, expected technique, default, sites")
    default = config.get("default") or {}
    if not isinstance(default, Mapping):
        raise UserError(f"{PASS}: config 'default' is a {type(default).__name__}, expected an object of settings")
    default = dict(default)
    default.setdefault("technique", config.get("technique") or technique)
    sites = config.get("sites") or {}
    if not isinstance(sites, Mapping):
        raise UserError(f"{PASS}: config 'sites' is a {type(sites).__name__}, expected an object {{site: settings}}")
    for name, v in sites.items():
        if v is not None and not isinstance(v, Mapping):
            raise UserError(f"{PASS}: config site {name!r} is a {type(v).__name__}, expected an object of settings or null")
    for name, t in [("default", default.get("technique"))] + [(k, (v or {}).get("technique")) for k, v in sites.items()]:
        if t is not None and t not in TECHNIQUES:
            raise UserError(f"{PASS}: technique {t!r} (in {name}) is not one of {', '.join(TECHNIQUES)}")
    return default, {k: (dict(v) if v is not None else None) for k, v in sites.items()}


@dataclass
class SitePlan:
    """One site's plan: its rule and resolved setting, or the reason it stays as it is; `fit` is what
    calibration fitted for it (the plan's data-dependent part) and `replacement` what replaces it."""

    site: Site
    rule: SiteRule | None
    setting: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    replacement: Replacement | None = None


def plan_sites(sites: list[Site], default: dict[str, Any], per_site: dict[str, dict | None],
               rule_for) -> list[SitePlan]:
    """Each site's technique and full setting from the config, checked by its rule (no inference)."""
    plans = []
    for site in sites:
        if site.name in per_site and per_site[site.name] is None:
            plans.append(SitePlan(site, None, reason="left alone by the config"))
            continue
        own = per_site.get(site.name) or {}
        # the default's settings belong to the default technique; a site naming another keeps only its own
        setting = {**own} if own.get("technique", default.get("technique")) != default.get("technique") else {**default, **own}
        tech = setting.pop("technique", None)
        if tech is None:
            plans.append(SitePlan(site, None, reason="no technique for this site in the config"))
            continue
        rule = rule_for(tech)
        unknown = set(setting) - set(rule.keys)
        if unknown:
            raise UserError(f"{PASS}: setting {sorted(unknown)[0]!r} (for {site.name}) is not a {tech} setting, "
                            f"expected some of {', '.join(rule.keys)}")
        setting = {**rule.default_setting(site, setting), **setting}
        reason = rule.check(site, setting)
        if reason is None and site.residual is not None and not rule.residual:
            reason = f"{tech} does not take residual (Conv+Add+ReLU) sites"
        plans.append(SitePlan(site, rule if reason is None else None, setting, reason=reason))
    return plans


class RewritePass(ir.passes.InPlacePass):
    """Put each planned site's Replacement in place of its Conv, activation (and residual Add).

    Rules build their nodes from the op spec as ONNX NodeProtos (OPS[op].node, shared with the
    benchmarks and tests); this pass moves them into the IR model. `frozen`: run-time settings
    that become constants (no graph input).
    """

    def __init__(self, plans: list[SitePlan], frozen: set[str] = frozenset()):
        super().__init__()
        self.plans = [p for p in plans if p.replacement is not None]
        self.frozen = set(frozen)

    def requires(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        for p in self.plans:
            s = p.site
            for n in (s.conv, s.activation, s.add):
                if n is not None and n not in names:
                    raise RuntimeError(f"{PASS}: site {s.name}'s node {n!r} is not in the model")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nodes = {n.name: n for n in g}
        values: dict[str, ir.Value] = {v.name: v for v in g.inputs}
        values.update(g.initializers)
        values.update({o.name: o for n in g for o in n.outputs if o.name})
        # initializers of all sites, then run-time settings, in site order (the order onnx.save keeps)
        for arr_by_name, runtime in [({k: a for p in self.plans for k, a in p.replacement.initializers.items()}, False),
                                     ({k: a for p in self.plans for k, a in p.replacement.runtime_inputs.items()}, True)]:
            for name, arr in arr_by_name.items():
                arr = np.asarray(arr)
                v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
                v.type = ir.TensorType(ir.DataType.from_numpy(arr.dtype))
                g.register_initializer(v)
                if runtime and name not in self.frozen:
                    # symbolic dims: a per-filter (K, p, p) mask can take any pattern, a per-patch one
                    # any (K, OH, OW) layout, without editing the model; the kernels validate the values
                    v.shape = ir.Shape([f"{name}_{i}" for i in range(arr.ndim)])
                    g.inputs.append(v)
                else:
                    v.shape = ir.Shape(arr.shape)
                values[name] = v
        for p in self.plans:
            s, rep = p.site, p.replacement
            new, y = [], None
            for proto in rep.nodes:
                node = ir.Node(proto.domain, proto.op_type, [values[x] if x else None for x in proto.input],
                               [ir.serde.deserialize_attribute(a) for a in proto.attribute],
                               num_outputs=len(proto.output), name=proto.name)
                for v, name in zip(node.outputs, proto.output):
                    if name == s.y:
                        y = v  # named once the activation's output, which has that name now, is gone
                    else:
                        v.name = name
                        values[name] = v
                new.append(node)
            if y is None:
                raise RuntimeError(f"{PASS}: the {p.rule.technique} rule's nodes do not compute site {s.name}'s "
                                   f"output '{s.y}'")
            old_y = nodes[s.activation].outputs[0]
            y.type, y.shape = old_y.type, old_y.shape
            ir.convenience.replace_all_uses_with(old_y, y, replace_graph_outputs=True)
            old = [nodes[s.conv], nodes[s.activation]] + ([nodes[s.add]] if s.add else [])
            # the op reads the shortcut, which may be computed after the Conv: it takes the Add's place
            g.insert_before(nodes[s.add] if s.residual is not None else nodes[s.conv], new)
            g.remove(old, safe=True)
            old_y.name = None
            y.name = s.y
            values[s.y] = y
            for name in rep.drop_initializers:
                v = g.initializers.get(name)
                if v is not None and not v.uses() and v not in g.inputs:
                    g.initializers.pop(name)
        if self.plans:
            model.opset_imports.setdefault(DOMAIN, OP_VERSION)
        return ir.passes.PassResult(model, bool(self.plans))

    def ensures(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        for p in self.plans:
            gone = [n for n in (p.site.conv, p.site.activation, p.site.add) if n is not None and n in names]
            if gone:
                raise RuntimeError(f"{PASS}: site {p.site.name}'s node {gone[0]!r} is still in the model")


def rewrite(model: onnx.ModelProto, *, technique: str | None = None, config: Mapping[str, Any] | None = None,
            inputs: np.ndarray | None = None, labels: np.ndarray | None = None,
            normalized: bool = False, runtime_settings: bool = True,
            calibration: Calibration | None = None) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite `model`'s sites. `inputs`/`labels`: calibration data (lazy, sparse-quant, predictive).

    load -> normalize -> find sites -> plan (config + checks) -> calibrate -> rewrite, on one IR model.
    runtime_settings: masks, ratios and predictive thresholds become graph inputs with defaults
    (changeable per run); False freezes them as constants, which lets the kernels prepare them
    once at session creation — except the lazy ratio, which stays a run-time knob by design.
    calibration: a Calibration of the normalized `model` (normalized=True) to take the data from
    instead of `inputs`/`labels`; its fits are reused across calls (the search rewrites the same
    sites with the same settings many times).
    Returns (new model, report). The input model is not modified.
    """
    if technique is not None and technique not in TECHNIQUES:
        raise UserError(f"{PASS}: technique {technique!r} is not one of {', '.join(TECHNIQUES)}")
    default, per_site = parse_config(config, technique)
    if default.get("technique") is None and not per_site:
        raise UserError(f"{PASS}: no technique given, expected --technique {'|'.join(TECHNIQUES)} or a config")
    if normalized:
        base = model
        verdicts = explain(base)
        m = ir.serde.deserialize_model(model)  # shares model's weight buffers; model stays as it is
    else:
        # one IR model from normalize to emit; serialized before the rewrite only for calibration runs
        m, _ = normalize_ir(model)
        finder = FindSitesPass()
        run_passes([finder], m)
        verdicts = finder.verdicts
        base = ir.serde.serialize_model(m) if inputs is not None and calibration is None else None
    sites = [v.site for v in verdicts if v.site is not None]
    unknown = set(per_site) - {s.name for s in sites}
    if unknown:
        raise UserError(f"{PASS}: config names {sorted(unknown)[0]!r}, which is not a site "
                        f"(sites: {', '.join(s.name for s in sites) or 'none'})")
    calib = calibration or (Calibration(base, inputs, labels) if inputs is not None else None)
    rules: dict[str, SiteRule] = {}

    def rule_for(tech: str) -> SiteRule:
        return rules.get(tech) or rules.setdefault(tech, RULES[tech](m, has_data=calib is not None))

    plans = plan_sites(sites, default, per_site, rule_for)
    frozen: set[str] = set()
    for p in plans:
        if p.rule is None:
            continue
        p.fit = calib.fit(p.rule, p.site, p.setting) if calib is not None else p.rule.calibrate(p.site, p.setting, None)
        s = p.site
        p.replacement = p.rule.rewrite(s, p.setting, p.fit, s.y if s.clip_max is None else f"{s.y}__relu")
        if s.clip_max is not None:  # keep ReLU6's upper bound after the op
            lo, hi = f"{s.name}__clip_min", f"{s.name}__clip_max"
            p.replacement.initializers.update({lo: np.asarray(0.0, np.float32), hi: np.asarray(s.clip_max, np.float32)})
            p.replacement.nodes.append(helper.make_node("Clip", [f"{s.y}__relu", lo, hi], [s.y], name=f"{s.name}__clip"))
        if s.residual is not None and not any(s.residual in n.input for n in p.replacement.nodes):
            raise RuntimeError(f"{PASS}: the {p.rule.technique} rule dropped residual site {s.name}'s other input "
                               f"'{s.residual}'")
        if not runtime_settings and p.rule.technique != "lazy":  # the lazy ratio stays a run-time knob by design
            frozen.update(p.replacement.runtime_inputs)
    run_passes([RewritePass(plans, frozen)], m)
    out = ir.serde.serialize_model(m)
    results = [_result(p) for p in plans]
    _set_metadata(out, results)
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as e:
        raise RuntimeError(f"{PASS}: the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e
    return out, RewriteReport(verdicts, results)


def _result(p: SitePlan) -> SiteResult:
    if p.replacement is None:
        return SiteResult(p.site, None, p.setting, reason=p.reason)
    rep = p.replacement
    op_node = next(n for n in rep.nodes if n.domain == DOMAIN)
    spec = OPS[op_node.op_type]
    settings = {x.name: name for x, name in zip(spec.inputs, op_node.input) if name in rep.runtime_inputs}
    return SiteResult(p.site, p.rule.technique, rep.setting, rep.stats, op=op_node.name, y=op_node.output[0],
                      macs_output=macs_output_name(op_node), settings=settings)


def _set_metadata(model: onnx.ModelProto, results: list[SiteResult]) -> None:
    set_provenance(model, {r.site.name: {"technique": r.technique, "setting": jsonable(r.setting)}
                           for r in results if r.technique})
