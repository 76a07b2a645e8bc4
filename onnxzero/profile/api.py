"""profile_model: the one entry point (the CLI calls it with explicit keywords)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxzero import zoo
from onnxzero.data import Dataset, _fmt, check_fits, image_input, load_dataset
from onnxzero.errors import UserError
from onnxzero.load import load_model
from onnxzero.profile import runtime
from onnxzero.passes.sites import find_sites
from onnxzero.profile.activations import activation_nodes, bn_relu_chains
from onnxzero.profile.cost import model_params, node_macs, node_params
from onnxzero.profile.prepare import Prepared, prepare
from onnxzero.profile.progress import Steps
from onnxzero.profile.report import ActivationProfile, ModelSummary, NodeProfile, ProfileReport, SiteProfile

RANDOM_SEED = 0


def profile_model(model: str | Path, *, data: str | Path | None = None, runs: int = 10,
                  progress: bool = False) -> ProfileReport:
    """Profile a CNN: per-node cost and time, whole-model latency, exact ReLU zero rates.

    model: an .onnx path or ``zoo:NAME``. data: an .npz with ``inputs`` (float32,
    batch first) and optional int ``labels``; by default the zoo model's own data
    set, else one random normal(0, 1) sample (the report's notes say that zero
    rates then mean little). runs: timed runs for both the per-node profile and
    the whole-model latency (each after one warmup run). progress: show a rich
    progress bar on stderr.

    Raises UserError (one line: what is wrong, what was expected) for bad input.
    """
    if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or runs < 1:
        raise UserError(f"runs is {runs!r}, expected a positive integer")
    runs = int(runs)
    proto = load_model(model)
    spec = str(model)
    notes: list[str] = []

    data_path = Path(data) if data is not None else zoo.default_data(spec)
    if data_path is not None:
        ds = load_dataset(data_path)
        check_fits(ds, proto)
        data_label = str(data_path)
    else:
        ds = _random_dataset(proto)
        data_label = "random"
        notes.append("no data given: ran 1 random normal(0, 1) input; zero rates (and so the sites' savings) "
                     "depend on the data, so pass real data for figures that mean something")

    prep = prepare(proto)
    notes += prep.notes
    if prep.folded:
        kinds = ", ".join(f"{op} x{c}" for op, c in prep.folded.most_common())
        notes.append(f"folded {sum(prep.folded.values())} constant-only nodes ({kinds}) into initializers before "
                     "profiling: they compute weights and other constants, not inference work")
    if prep.renamed:
        notes.append(f"{prep.renamed} nodes had an empty or repeated name and were named as normalize names them "
                     "({op_type} or {name}, then _1, _2... in graph order): the names `rewrite --config` takes")

    batch = prep.analysis_batch
    feed = next(runtime.chunks(ds.inputs[:batch], batch, prep.static_batch))[1]
    acts = activation_nodes(prep)
    act_outputs = [n.output[0] for n in acts]
    logits_name = prep.model.graph.output[0].name

    labels = ds.labels
    classes = np.unique(labels) if labels is not None else np.zeros(0, np.int64)
    cls_idx = np.searchsorted(classes, labels) if labels is not None else None
    class_counts = np.bincount(cls_idx, minlength=len(classes)) if cls_idx is not None else np.zeros(0, np.int64)

    graph_outputs = [o.name for o in prep.model.graph.output]
    model_bytes = prep.model.SerializeToString()  # small: big weights are in prep.weights
    act_bytes = runtime.with_outputs(model_bytes, [o for o in dict.fromkeys(act_outputs) if o not in graph_outputs],
                                     prep.elem_types)
    with Steps(progress) as steps, tempfile.TemporaryDirectory(prefix="onnxzero-profile-") as td:
        # One session with graph optimizations off serves the per-node profile (fetching only the model's
        # outputs) and then, with profiling ended, the pass over the data (fetching the activations too).
        sess = runtime.open_session(act_bytes, prep.weights, optimize=False, profile_prefix=os.path.join(td, "ort"))
        times = runtime.profile_nodes(sess, prep.input_name, feed, graph_outputs, runs,
                                      steps.task("profiling nodes", runs + 1))
        chunk = _chunk_size(prep, act_outputs)
        if act_outputs or labels is not None:
            dp = runtime.run_data(sess, prep.input_name, ds.inputs, cls_idx, len(classes), labels, act_outputs,
                                  logits_name, prep.static_batch, chunk, steps.task("activations", len(ds)))
        else:  # nothing to count
            dp = runtime.DataPass({}, None, len(ds), chunk, False)
        del sess
        sess = runtime.open_session(model_bytes, prep.weights, optimize=True)
        latencies = runtime.time_model(sess, prep.input_name, feed, runs, steps.task("timing the model", runs + 1))
        del sess

    # shapes: shape inference first, the profiled run where it knew nothing
    shapes = dict(prep.shapes)
    from_runtime = 0
    for n in prep.nodes:
        for i, (name, shp) in enumerate(zip(n.output, times.output_shapes.get(n.name, []), strict=False)):
            known = shapes.get(name)
            if name and (known is None or any(d is None for d in known)):
                shapes[name] = tuple(shp)
                from_runtime += i == 0  # the shape the node table shows (not e.g. an unused Dropout mask)
    if from_runtime:
        notes.append(f"{from_runtime} output shapes unknown to ONNX shape inference were taken from the profiled run")

    shares = time_shares({n.name: times.latency_ms.get(n.name, 0.0) for n in prep.nodes})
    nodes: list[NodeProfile] = []
    unknown_macs = []
    for n in prep.nodes:
        macs = node_macs(n, shapes, batch)
        if macs is None:
            unknown_macs.append(n.name)
            macs = 0
        lat = times.latency_ms.get(n.name, 0.0)
        out_shape = list(shapes.get(n.output[0], ())) if n.output and n.output[0] else []
        nodes.append(NodeProfile(name=n.name, op_type=n.op_type, output_shape=out_shape, params=node_params(n, prep),
                                 macs=int(macs), latency_ms=lat, time_share=shares[n.name],
                                 latency_median_ms=times.median_ms.get(n.name, 0.0)))
    if unknown_macs:
        notes.append(f"MACs of {len(unknown_macs)} nodes are counted as 0 because their shapes are unknown: "
                     + ", ".join(unknown_macs[:5]) + (" ..." if len(unknown_macs) > 5 else ""))
    by_name = {p.name: p for p in nodes}

    activations: list[ActivationProfile] = []
    skipped = []
    for n in acts:
        c = dp.counters[n.output[0]]
        if c.skipped:
            skipped.append(n.name)
        rates = c.per_class(class_counts)
        per_class = None if rates is None else {int(k): float(v) for k, v in zip(classes, rates, strict=True)}
        activations.append(ActivationProfile(
            node=n.name, op_type=n.op_type, output=n.output[0], output_shape=list(shapes.get(n.output[0], ())),
            zero_rate=c.zero_rate(), per_channel=c.per_channel(), per_class=per_class,
            per_class_channel=c.per_class_channel(class_counts)))
    if skipped:
        notes.append(f"{len(skipped)} activations do not keep the batch on axis 0 and have no zero rates: "
                     + ", ".join(skipped[:5]))
    if dp.fell_back:
        notes.append("the batch dimension is declared dynamic but the graph only runs at batch 1: "
                     "the data ran one sample at a time")
    zr = {a.output: a.zero_rate for a in activations}

    sites: list[SiteProfile] = []
    for site in find_sites(prep.model):  # the rewrite's own site finder, on the same names
        parts = [site.conv, site.add, site.activation] if site.add else [site.conv, site.activation]
        macs = by_name[site.conv].macs
        z = zr.get(site.y, math.nan)
        share = sum(by_name[p].time_share for p in parts)
        sites.append(SiteProfile(node=site.conv, relu=site.activation, macs=macs, zero_rate=z, macs_zero=macs * z,
                                 time_share=share, est_time_saved=share * z))
    if not sites and (chains := bn_relu_chains(prep)):
        notes.append(f"no Conv feeds a ReLU directly, but {chains} Conv -> BatchNormalization -> ReLU chains do: "
                     "fold BatchNormalization into the Conv to expose them as sites")

    correct = dp.correct
    summary = ModelSummary(
        name=spec if spec.startswith(zoo.PREFIX) else Path(spec).name,
        input_name=prep.input_name, input_shape=[batch, *prep.input_dims[1:]] if data_path is None
        else [batch, *ds.inputs.shape[1:]],
        data=data_label, samples=len(ds), params=model_params(prep), macs=sum(p.macs for p in nodes),
        **dict(zip(("latency_median_ms", "latency_p90_ms"), latency_stats(latencies), strict=True)),
        latency_batch_size=batch, latency_runs=runs,
        accuracy=None if correct is None or labels is None else correct / len(ds))
    return ProfileReport(model=summary, nodes=nodes, activations=activations, sites=sites, notes=notes,
                         classes=[int(c) for c in classes])


def time_shares(latency_ms: dict[str, float]) -> dict[str, float]:
    """Each node's share of the summed per-node time (0 for all when nothing was timed)."""
    total = sum(latency_ms.values())
    return {k: v / total if total else 0.0 for k, v in latency_ms.items()}


def latency_stats(latencies_ms) -> tuple[float, float]:
    """(median, 90th percentile, linearly interpolated) of the whole-model run times."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 90))


def _random_dataset(model: onnx.ModelProto) -> Dataset:
    name, dims = image_input(model)
    if not dims or any(d is None for d in dims[1:]):
        raise UserError(f"model input '{name}' has shape {_fmt(dims)}: random inputs need every dimension "
                        "but the batch fixed, expected data=... with real inputs")
    x = np.random.default_rng(RANDOM_SEED).standard_normal((dims[0] or 1, *dims[1:]), dtype=np.float32)
    return Dataset(inputs=x, labels=None, path=Path("random"))


def _chunk_size(prep: Prepared, act_outputs: list[str]) -> int:
    """Samples per run of the data pass, so the activations of one chunk stay within the budget."""
    per_sample = 0
    for name in act_outputs:
        s = prep.shapes.get(name)
        if not s or any(d is None for d in s):
            return 16
        per_sample += 4 * math.prod(s) // prep.analysis_batch
    return max(1, min(runtime.MAX_CHUNK, runtime.ACTIVATION_BUDGET // max(per_sample, 1)))
