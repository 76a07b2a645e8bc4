"""`onnxzero bench ops`: each custom op against onnxruntime's own Conv+Relu, in wall-clock time.

For every bench layer (onnxzero.bench.common.LAYERS) and every op module onnxzero/bench/op_*.py
(each with `OP` and `build(layer, skip, rng) -> BenchCase`, optionally `SKIPS`, the skip targets it
supports), at each skip target (default: common.DEFAULT_SKIPS, the targets' skips; any of
common.SKIPS on request):

  * the op's one-node model from `build`, and the reference: onnxruntime's standard Conv(+B) -> Relu
    with the same W and B (read from the op node's inputs 1 and 2) and the same Conv attributes,
    both with default graph optimizations (ORT_ENABLE_ALL, so onnxruntime uses its best Conv) and the
    same intra-op thread count;
  * the skip actually reached, read from the op's own `macs` output: 1 - macs / dense MACs;
  * timing: warm-up runs, then `runs` timed runs of each, interleaved in alternating blocks so machine
    noise (this is a shared 2-core box) hits both alike, each block after a short pause that lets the
    other session's spinning pool threads go to sleep (see time_interleaved); the ratio is
    median(op) / median(reference).

In context (issue 10): an op alone hides what a model pays around it. onnxruntime keeps its own
convs in its blocked NCHWc layout and fuses Conv+Relu; a custom op between them costs reorders and
lost fusions. So for each layer with a chain (common.chain_for: op -> op -> op of the same shape,
or the stem followed by two 64@28x28 convs) the same skip target is also measured as a three-node
chain of the op against the same chain of Conv+Relu in onnxruntime (default optimizations, so its
convs run NCHWc with reorders only at the chain's edges), interleaved the same way. The chain's
ops are built one after the other on the real input each one sees (modules whose build() takes
`x=`), and the chain's skip is read from the sum of the ops' `macs` outputs.

Records: {"op", "layer", "skip_target", "skip", "ratio", "op_ms", "ort_ms", "setting", "macs",
"dense_macs", "threads", "runs", "op_min_ms", "ort_min_ms", "ratio_min", "ratio_p25"} (+ "error" when a
case could not run), and for chained layers {"chain_layers", "chain_skip", "chain_ratio", "chain_op_ms",
"chain_ort_ms", "chain_ratio_min", "chain_ratio_p25"} (or "chain_error"), and where the chain's ops take
blocked tensors (passes/chain_layout.block_chains) {"chain_blocked_ratio", "chain_blocked_ms",
"chain_blocked_ratio_p25"}: the same chain with blocked tensors between its ops, as deployed. `render_table` prints ratio per op x layer x
skip (the chain ratio under it) and marks the issue's targets (TARGETS, op alone) met or missed.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort

from onnxzero.ops.session import make_session
from onnx import helper, numpy_helper

import onnxzero.bench as bench_pkg
from onnxzero import DOMAIN, get_library_path
from onnxzero.bench.common import DEFAULT_SKIPS, LAYERS, BenchCase, Layer, chain_for
from onnxzero.ops.conv_relu import onnx_conv_relu_model
from onnxzero.ops.session import conv_geometry

# The targets: op -> {skip target: max ratio op time / onnxruntime time}, every layer shape.
TARGETS: dict[str, dict[float, float]] = {
    "ConvRelu": {0.0: 1.1},
    "LazyConv": {0.0: 1.1, 0.5: 0.6, 0.9: 0.25},
    "SparseQuantConv": {0.0: 1.5, 0.5: 0.6, 0.9: 0.25},
    "SpatialConv": {0.0: 1.15, 0.5: 0.8},
    "EarlyExitConv": {0.0: 1.5, 0.5: 1.0},
}

_CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")


def discover() -> dict[str, ModuleType]:
    """op name -> its bench module (onnxzero/bench/op_*.py), sorted by module name."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(bench_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("op_"):
            mod = importlib.import_module(f"{bench_pkg.__name__}.{info.name}")
            if hasattr(mod, "OP") and hasattr(mod, "build"):
                found[mod.OP] = mod
    return found


def _select_ops(modules: dict[str, ModuleType], ops: list[str] | None) -> dict[str, ModuleType]:
    if not ops:
        return modules
    out = {}
    for want in ops:
        key = want.lower().replace("_", "")
        hits = [op for op, mod in modules.items()
                if key in (op.lower(), mod.__name__.rsplit(".", 1)[-1][3:].replace("_", ""))]
        if not hits:
            raise ValueError(f"unknown op {want!r}; known: {', '.join(modules)}")
        for op in hits:
            out[op] = modules[op]
    return out


def _select_layers(layers: list[str] | None) -> list[Layer]:
    if not layers:
        return list(LAYERS)
    out = []
    for want in layers:
        exact = [layer for layer in LAYERS if layer.name == want]
        hits = exact or [layer for layer in LAYERS if want.lower() in layer.name.lower()]
        if not hits:
            raise ValueError(f"unknown layer {want!r}; known: {', '.join(layer.name for layer in LAYERS)}")
        out += [layer for layer in hits if layer not in out]
    return out


def reference_model(case: BenchCase, layer: Layer) -> onnx.ModelProto:
    """onnxruntime's Conv(+B)+Relu with the op node's own W, B and Conv attributes."""
    if "reference_model" in case.extra:
        return case.extra["reference_model"]
    node = next(n for n in case.model.graph.node if n.domain == DOMAIN)
    inits = {t.name: t for t in case.model.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])
    b = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _CONV_ATTRS}
    if isinstance(attrs.get("auto_pad"), bytes):
        attrs["auto_pad"] = attrs["auto_pad"].decode()
    return onnx_conv_relu_model(w, b, layer.x_shape, **attrs)


def _session(model: onnx.ModelProto, threads: int, library: bool) -> ort.InferenceSession:
    # make_session turns intra-op spinning off: two sessions alternating on 2 cores would
    # otherwise measure each other's spinning threads
    return make_session(model, threads=threads, library=library)


def time_interleaved(run_a: Callable[[], object], run_b: Callable[[], object], runs: int,
                     warmup: int = 3, block: int = 5, gap_s: float = 0.003) -> tuple[list[float], list[float]]:
    """Seconds per run of a and b: `runs` timed runs each, in alternating blocks of `block` runs
    (a-block b-block, then b-block a-block, ...), so slow drifts of a noisy machine hit both alike.

    Each block starts with a pause of gap_s and one untimed run: onnxruntime's intra-op threads spin
    after a run (its default), and on a 2-core machine the other session's spinning threads would
    otherwise steal a core from the first runs of this block (measured: onnxruntime's Conv right
    after a custom-op run took 5x longer without the pause). The untimed run brings this session's
    own threads back from sleep, so timed runs see the steady state of back-to-back inference."""
    for _ in range(warmup):
        run_a()
        run_b()
    ta: list[float] = []
    tb: list[float] = []
    i = 0
    while len(ta) < runs or len(tb) < runs:
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            fn, out = (run_a, ta) if which == 0 else (run_b, tb)
            n = min(block, runs - len(out))
            if n <= 0:
                continue
            time.sleep(gap_s)
            fn()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        i += 1
    return ta, tb


def _dense_macs(layer: Layer) -> int:
    g = conv_geometry(layer.x_shape, layer.w_shape, strides=(layer.stride,) * 2, pads=(layer.pad,) * 4)
    return layer.x_shape[0] * g.macs


def _main_output(model: onnx.ModelProto) -> str:
    return next(o.name for o in model.graph.output if not o.name.endswith("macs"))


def stitch(models: list[onnx.ModelProto], feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, dict]:
    """Chain one-layer models (graph input 'X', one float output, optional 'macs' output and run-time
    inputs): model i's output feeds model i+1's X. Every other name of model i gets the prefix
    'c{i}_' (run-time inputs too, in the returned feeds); the chain keeps input 'X', outputs the last
    model's output and every model's 'macs' (as 'c{i}_macs')."""
    graph = helper.make_graph([], "chain", [], [])
    out_feeds: dict[str, np.ndarray] = {}
    opsets: dict[str, int] = {}
    prev = "X"
    for i, (m, f) in enumerate(zip(models, feeds)):
        def ren(name: str, i=i, prev=prev) -> str:
            return name if not name else prev if name == "X" else f"c{i}_{name}"

        for j, n in enumerate(m.graph.node):
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"c{i}_{n.name or j}"
            c.input[:] = [ren(v) for v in n.input]
            c.output[:] = [ren(v) for v in n.output]
            graph.node.append(c)
        inits = {t.name for t in m.graph.initializer}
        for t in m.graph.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = ren(t.name)
            graph.initializer.append(c)
        for vi in m.graph.input:
            if vi.name == "X":
                if i == 0:
                    graph.input.append(vi)
                    out_feeds["X"] = f["X"]
                continue
            c = onnx.ValueInfoProto()
            c.CopyFrom(vi)
            c.name = ren(vi.name)
            if vi.name not in inits:
                graph.input.append(c)
            if vi.name in f:
                out_feeds[c.name] = f[vi.name]
        for o in m.graph.output:
            if o.name.endswith("macs"):
                c = onnx.ValueInfoProto()
                c.CopyFrom(o)
                c.name = ren(o.name)
                graph.output.append(c)
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        prev = ren(_main_output(m))
    graph.output.insert(0, helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, None))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]), out_feeds


def build_chain(module: ModuleType, layers: list[Layer], skip: float, seed: int = 0
                ) -> tuple[onnx.ModelProto, dict, onnx.ModelProto, dict, int]:
    """(op chain, its feeds, onnxruntime's Conv+Relu chain, its feeds, dense MACs of the chain).

    Each op is built for its layer and skip target; a module whose build() takes `x=` gets the input
    the op really sees in the chain (the previous ops' output), so settings fitted to the input
    (e.g. spatial's dead-patch biases) hold in context."""
    rng = np.random.default_rng(seed)
    takes_x = "x" in inspect.signature(module.build).parameters
    cases: list[BenchCase] = []
    x = None
    for i, layer in enumerate(layers):
        case = module.build(layer, skip, rng, x=x) if takes_x and x is not None else module.build(layer, skip, rng)
        if i > 0:  # the chain feeds the op the previous output, not the case's own X
            case.feeds = {**case.feeds, "X": x}
        cases.append(case)
        if i + 1 < len(layers):
            sess = make_session(case.model, threads=2)
            x = sess.run([_main_output(case.model)], case.feeds)[0]
    op_model, op_feeds = stitch([c.model for c in cases], [c.feeds for c in cases])
    refs = [reference_model(c, layer) for c, layer in zip(cases, layers)]
    ref_model, ref_feeds = stitch(refs, [{"X": cases[0].feeds["X"]}] + [{}] * (len(refs) - 1))
    return op_model, op_feeds, ref_model, ref_feeds, sum(_dense_macs(layer) for layer in layers)


def _p25(t: list[float]) -> float:
    # On a loaded 2-core box run times are bimodal (runs that lost a core to another process take
    # 2-5x longer) and the median can land on either mode; the 25th percentile stays in the fast one.
    return float(np.percentile(t, 25))


def run_chain(module: ModuleType, layers: list[Layer], skip: float, *, runs: int, threads: int, seed: int = 0) -> dict:
    """The chain fields of a record: skip reached, interleaved medians and their ratio."""
    op_model, op_feeds, ref_model, ref_feeds, dense = build_chain(module, layers, skip, seed)
    op_sess = _session(op_model, threads, library=True)
    ref_sess = _session(ref_model, threads, library=False)
    names = [o.name for o in op_sess.get_outputs()]
    outs = op_sess.run(None, op_feeds)
    macs = sum(int(np.asarray(v)) for n, v in zip(names, outs) if n.endswith("macs"))
    t_op, t_ref = time_interleaved(lambda: op_sess.run(None, op_feeds), lambda: ref_sess.run(None, ref_feeds),
                                   runs, warmup=max(3, runs // 10))
    op_ms, ort_ms = statistics.median(t_op) * 1e3, statistics.median(t_ref) * 1e3
    rec = {"chain_layers": [layer.name for layer in layers], "chain_skip": 1.0 - macs / dense,
           "chain_ratio": op_ms / ort_ms, "chain_op_ms": op_ms, "chain_ort_ms": ort_ms,
           "chain_ratio_min": min(t_op) / min(t_ref), "chain_ratio_p25": _p25(t_op) / _p25(t_ref)}
    # The same chain as apply_chains deploys it: blocked tensors between the ops (only where the
    # ops' weights allow it; ops that take no layout attributes leave the chain as it was).
    from onnxzero.passes.chain_layout import block_chains

    blocked = block_chains(op_model)
    if blocked != op_model:
        del op_sess
        bl_sess = _session(blocked, threads, library=True)
        t_bl, t_ref = time_interleaved(lambda: bl_sess.run(None, op_feeds), lambda: ref_sess.run(None, ref_feeds),
                                       runs, warmup=max(3, runs // 10))
        bl_ms, ort_ms = statistics.median(t_bl) * 1e3, statistics.median(t_ref) * 1e3
        rec.update(chain_blocked_ratio=bl_ms / ort_ms, chain_blocked_ms=bl_ms,
                   chain_blocked_ratio_p25=_p25(t_bl) / _p25(t_ref))
    return rec


def run_case(op: str, module: ModuleType, layer: Layer, skip: float, *, runs: int, threads: int,
             seed: int = 0, chain: bool = True) -> dict:
    """One record: build the op's case, its reference, measure skip and the interleaved timing."""
    rec: dict = {"op": op, "layer": layer.name, "skip_target": float(skip), "threads": threads, "runs": runs}
    rng = np.random.default_rng(seed)
    case: BenchCase = module.build(layer, skip, rng)
    rec["setting"] = case.setting
    op_sess = _session(case.model, threads, library=True)
    ref_sess = _session(reference_model(case, layer), threads, library=False)
    out_names = [o.name for o in op_sess.get_outputs()]
    if "macs" not in out_names:
        raise ValueError(f"{op}'s bench model has no 'macs' output (outputs: {out_names})")
    ref_feeds = {"X": case.feeds["X"]}
    outs = op_sess.run(None, case.feeds)
    macs = int(np.asarray(outs[out_names.index("macs")]))
    dense = _dense_macs(layer)
    t_op, t_ref = time_interleaved(lambda: op_sess.run(None, case.feeds), lambda: ref_sess.run(None, ref_feeds),
                                   runs, warmup=max(3, runs // 10))
    op_ms, ort_ms = statistics.median(t_op) * 1e3, statistics.median(t_ref) * 1e3
    # ratio_min (best run over best run) is reported beside the median ratio: on an overloaded machine
    # the best runs are the ones no other process preempted.
    rec.update(skip=1.0 - macs / dense, ratio=op_ms / ort_ms, op_ms=op_ms, ort_ms=ort_ms, macs=macs,
               dense_macs=dense, op_min_ms=min(t_op) * 1e3, ort_min_ms=min(t_ref) * 1e3,
               ratio_min=min(t_op) / min(t_ref), ratio_p25=_p25(t_op) / _p25(t_ref))
    del op_sess, ref_sess
    layers = chain_for(layer) if chain else None
    if layers:
        try:
            rec.update(run_chain(module, layers, skip, runs=runs, threads=threads, seed=seed))
        except Exception as e:  # noqa: BLE001 - the op-alone numbers still stand
            rec["chain_error"] = f"{type(e).__name__}: {e}"
    return rec


def run_ops_bench(*, ops: list[str] | None = None, layers: list[str] | None = None, skips: list[float] | None = None,
                  runs: int = 20, threads: int = 2, progress: bool = False, seed: int = 0,
                  chain: bool = True) -> list[dict]:
    """Run every (op, layer, skip) case; see the module docstring. Failing cases get an "error"."""
    modules = _select_ops(discover(), ops)
    chosen_layers = _select_layers(layers)
    skips = list(DEFAULT_SKIPS if skips is None else skips)
    todo = []
    for layer in chosen_layers:
        for op, mod in modules.items():
            supported = getattr(mod, "SKIPS", None)
            for skip in skips:
                if supported is None or any(abs(skip - s) < 1e-9 for s in supported):
                    todo.append((op, mod, layer, skip))
    records: list[dict] = []
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        task = bar.add_task("bench ops", total=len(todo))
        bar.start()
    try:
        for op, mod, layer, skip in todo:
            if bar is not None:
                bar.update(task, description=f"{op} {layer.name} skip {skip:.0%}")
            try:
                rec = run_case(op, mod, layer, skip, runs=runs, threads=threads, seed=seed, chain=chain)
            except Exception as e:  # noqa: BLE001 - a broken case is reported, the others still run
                rec = {"op": op, "layer": layer.name, "skip_target": float(skip), "threads": threads, "runs": runs,
                       "error": f"{type(e).__name__}: {e}"}
            records.append(rec)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return records


def target_for(op: str, skip_target: float) -> float | None:
    for s, t in TARGETS.get(op, {}).items():
        if abs(s - skip_target) < 1e-9:
            return t
    return None


def missed_targets(records: list[dict]) -> list[dict]:
    """Records whose (op, skip target) has a target that the measured ratio misses (or that failed)."""
    out = []
    for r in records:
        t = target_for(r["op"], r["skip_target"])
        if t is not None and ("error" in r or r["ratio"] > t):
            out.append({**r, "target": t})
    return out


def render_table(records: list[dict], console=None) -> None:
    """Rich table: one row per (op, layer), one column per skip target; each cell is the time ratio
    op / onnxruntime with the measured skip; green = target met, red = missed, plain = no target."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    skips = sorted({r["skip_target"] for r in records})
    table = Table(title="op time / onnxruntime Conv+Relu time (median), measured skip in brackets; "
                        "under it, the same in a three-conv chain (in context)")
    table.add_column("op")
    table.add_column("layer")
    for s in skips:
        table.add_column(f"skip {s:.0%}", justify="right")
    rows: dict[tuple[str, str], dict[float, dict]] = {}
    for r in records:
        rows.setdefault((r["op"], r["layer"]), {})[r["skip_target"]] = r
    for (op, layer), cells in rows.items():
        out = []
        for s in skips:
            r = cells.get(s)
            if r is None:
                out.append("")
                continue
            t = target_for(op, s)
            if "error" in r:
                out.append("[red]error[/red]")
                continue
            text = f"{r['ratio']:.2f} ({r['skip']:.0%})"
            if t is not None:
                ok = r["ratio"] <= t
                text = f"[{'green' if ok else 'red'}]{text} {'<=' if ok else '>'} {t:g}[/]"
            if "chain_ratio" in r:
                text += f"\nchain {r['chain_ratio']:.2f} ({r['chain_skip']:.0%})"
                if "chain_blocked_ratio" in r:
                    text += f"\nblocked {r['chain_blocked_ratio']:.2f}"
            elif "chain_error" in r:
                text += "\n[red]chain error[/red]"
            out.append(text)
        table.add_row(op, layer, *out)
    console.print(table)
    missed = missed_targets(records)
    if missed:
        console.print(f"[red]{len(missed)} target(s) missed:[/red]")
        for r in missed:
            what = r.get("error") or f"ratio {r['ratio']:.2f} > {r['target']:g} (skip {r['skip']:.0%})"
            console.print(f"  {r['op']} {r['layer']} skip {r['skip_target']:.0%}: {what}")
    else:
        console.print("[green]all targets met[/green]")
    errors = [r for r in records if "error" in r and target_for(r["op"], r["skip_target"]) is None]
    for r in errors:
        console.print(f"[red]error[/red] {r['op']} {r['layer']} skip {r['skip_target']:.0%}: {r['error']}")
    for r in records:
        if "chain_error" in r:
            console.print(f"[red]chain error[/red] {r['op']} {r['layer']} skip {r['skip_target']:.0%}: {r['chain_error']}")
