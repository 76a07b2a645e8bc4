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
from onnx import helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION, UserError
from onnxzero.emit import METADATA_KEY, freeze_settings, jsonable, provenance, set_provenance  # noqa: F401 - re-exported
from onnxzero.evaluate import macs_output_name
from onnxzero.ops.spec import OPS
from onnxzero.passes.normalize import normalize_ir, run_passes
from onnxzero.passes.rules import RULES, TECHNIQUES, Calibration, SiteRule
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


def rewrite(model: onnx.ModelProto, *, technique: str | None = None, config: Mapping[str, Any] | None = None,
            inputs: np.ndarray | None = None, labels: np.ndarray | None = None,
            normalized: bool = False, runtime_settings: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite `model`'s sites. `inputs`/`labels`: calibration data (lazy, sparse-quant, predictive).

    runtime_settings: masks, ratios and predictive thresholds become graph inputs with defaults
    (changeable per run); False freezes them as constants, which lets the kernels prepare them
    once at session creation — except the lazy ratio, which stays a run-time knob by design.
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
    else:
        # one IR model from normalize to the site finder; serialized once, for the rewrite below
        m, _ = normalize_ir(model)
        finder = FindSitesPass()
        run_passes([finder], m)
        base, verdicts = ir.serde.serialize_model(m), finder.verdicts
    sites = [v.site for v in verdicts if v.site is not None]
    unknown = set(per_site) - {s.name for s in sites}
    if unknown:
        raise UserError(f"{PASS}: config names {sorted(unknown)[0]!r}, which is not a site "
                        f"(sites: {', '.join(s.name for s in sites) or 'none'})")
    calib = Calibration(base, inputs, labels) if inputs is not None else None
    rules: dict[str, SiteRule] = {}

    out = onnx.ModelProto()
    out.CopyFrom(base)
    g = out.graph
    index = {n.name: i for i, n in enumerate(g.node)}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # conv node index -> replacement nodes
    removed: set[int] = set()
    new_inits: dict[str, np.ndarray] = {}
    runtime: dict[str, np.ndarray] = {}
    drop: set[str] = set()
    frozen: set[str] = set()
    results: list[SiteResult] = []

    for site in sites:
        if site.name in per_site and per_site[site.name] is None:
            results.append(SiteResult(site, None, reason="left alone by the config"))
            continue
        own = per_site.get(site.name) or {}
        # the default's settings belong to the default technique; a site naming another keeps only its own
        setting = {**own} if own.get("technique", default.get("technique")) != default.get("technique") else {**default, **own}
        tech = setting.pop("technique", None)
        if tech is None:
            results.append(SiteResult(site, None, reason="no technique for this site in the config"))
            continue
        rule = rules.get(tech) or rules.setdefault(tech, RULES[tech](base, calib))
        unknown = set(setting) - set(rule.keys)
        if unknown:
            raise UserError(f"{PASS}: setting {sorted(unknown)[0]!r} (for {site.name}) is not a {tech} setting, "
                            f"expected some of {', '.join(rule.keys)}")
        setting = {**rule.default_setting(site, setting), **setting}
        reason = rule.check(site, setting)
        if reason is None and site.residual is not None and not rule.residual:
            reason = f"{tech} does not take residual (Conv+Add+ReLU) sites"
        if reason:
            results.append(SiteResult(site, None, setting, reason=reason))
            continue
        act_out = site.y if site.clip_max is None else f"{site.y}__relu"
        rep = rule.rewrite(site, setting, act_out)
        nodes = list(rep.nodes)
        if site.clip_max is not None:  # keep ReLU6's upper bound after the op
            lo, hi = f"{site.name}__clip_min", f"{site.name}__clip_max"
            new_inits[lo] = np.asarray(0.0, np.float32)
            new_inits[hi] = np.asarray(site.clip_max, np.float32)
            nodes.append(helper.make_node("Clip", [act_out, lo, hi], [site.y], name=f"{site.name}__clip"))
        if site.residual is not None:
            if not any(site.residual in n.input for n in nodes):
                raise RuntimeError(f"{PASS}: the {tech} rule dropped residual site {site.name}'s other input "
                                   f"'{site.residual}'")
            # the op reads the shortcut, which may be computed after the Conv: it takes the Add's place
            replaced[index[site.add]] = nodes
            removed.update((index[site.conv], index[site.activation]))
        else:
            replaced[index[site.conv]] = nodes
            removed.add(index[site.activation])
        new_inits.update(rep.initializers)
        runtime.update(rep.runtime_inputs)
        if not runtime_settings and tech != "lazy":  # the lazy ratio stays a run-time knob by design
            frozen.update(rep.runtime_inputs)
        drop.update(rep.drop_initializers)
        op_node = next(n for n in rep.nodes if n.domain == DOMAIN)
        spec = OPS[op_node.op_type]
        settings = {x.name: name for x, name in zip(spec.inputs, op_node.input) if name in rep.runtime_inputs}
        results.append(SiteResult(site, tech, rep.setting, rep.stats, op=op_node.name, y=op_node.output[0],
                                  macs_output=macs_output_name(op_node), settings=settings))

    if replaced:
        nodes = []
        for i, n in enumerate(g.node):
            if i in replaced:
                nodes.extend(replaced[i])
            elif i not in removed:
                nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        used = {name for n in g.node for name in n.input}
        keep = [t for t in g.initializer if not (t.name in drop and t.name not in used)]
        del g.initializer[:]
        g.initializer.extend(keep)
        for name, arr in {**new_inits, **runtime}.items():
            g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        for name, arr in runtime.items():
            # symbolic dims: a per-filter (K, p, p) mask can take any pattern, a per-patch one
            # any (K, OH, OW) layout, without editing the model; the kernels validate the values
            arr = np.asarray(arr)
            g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                         [f"{name}_{i}" for i in range(arr.ndim)]))
        freeze_settings(out, frozen)
        if not any(o.domain == DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
        # value_info of the removed Conv outputs would dangle
        gone = {s.site.conv_output for s in results if s.technique}
        gone |= {n for s in results if s.technique and s.site.add for n in _outputs(base, s.site.add)}
        vi = [v for v in g.value_info if v.name not in gone]
        del g.value_info[:]
        g.value_info.extend(vi)
    _set_metadata(out, results)
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as e:
        raise RuntimeError(f"{PASS}: the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e
    return out, RewriteReport(verdicts, results)


def _outputs(model: onnx.ModelProto, node_name: str) -> list[str]:
    return [o for n in model.graph.node if n.name == node_name for o in n.output]


def _set_metadata(model: onnx.ModelProto, results: list[SiteResult]) -> None:
    set_provenance(model, {r.site.name: {"technique": r.technique, "setting": jsonable(r.setting)}
                           for r in results if r.technique})
