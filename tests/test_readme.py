"""README examples are executed, so the docs never go stale (onnx-graphsurgeon's habit)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path):
    """The deploy example runs on a model written by the CLI (exact early exit keeps accuracy)."""
    import shutil

    from click.testing import CliRunner

    from onnxzero import zoo
    from onnxzero.cli.main import cli

    r = CliRunner().invoke(cli, ["rewrite", "zoo:lenet5", "--technique", "early-exit", "-o", str(tmp_path / "model.onnxzero.onnx")])
    assert r.exit_code == 0, r.output
    shutil.copy(zoo.path("mnist"), tmp_path / "digits.npz")
    py = blocks("python")
    assert py, "README has no python example"
    for code in py:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        assert re.search(r"\[\d( \d)+\]", p.stdout), p.stdout  # the predicted digits


def test_readme_setup_commands_are_the_ci_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    bash = "\n".join(blocks("bash"))
    assert 'python -m pip install ".[test]" && pytest' in ci
    assert 'python -m pip install ".[test]" && pytest' in bash
    assert "python -m pip install . && onnxzero" in bash


def test_readme_cli_commands_exist():
    from click.testing import CliRunner

    from onnxzero.cli.main import cli

    for line in "\n".join(blocks("bash")).splitlines():
        m = re.match(r"(?:.*&& )?onnxzero ((?:\w|-)+)(?: ((?:\w|-)+))?", line.strip())
        if not m:
            continue
        args = [a for a in m.groups() if a and not a.startswith("zoo:")]
        r = CliRunner().invoke(cli, [*args, "--help"])
        assert r.exit_code == 0, (line, r.output)
