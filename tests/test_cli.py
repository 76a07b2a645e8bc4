"""The command line: user errors are one line, exit non-zero, write nothing."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxzero import zoo
from onnxzero.cli.main import cli


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result


def assert_user_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err!r}"
    assert err.startswith("onnxzero: error: ")
    for f in fragments:
        assert f in err, err


@pytest.fixture()
def lenet_bytes():
    return zoo.path("lenet5").read_bytes()


def test_missing_model_file(tmp_path):
    out = tmp_path / "p.json"
    assert_user_error(run("profile", tmp_path / "nope.onnx", "--json", out), "model file not found", "expected an .onnx file")
    assert not out.exists()


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    assert_user_error(run("profile", bad, "--json", tmp_path / "p.json"), "not a valid ONNX model")
    assert not (tmp_path / "p.json").exists()


def test_truncated_model(tmp_path, lenet_bytes):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(lenet_bytes[: len(lenet_bytes) // 2])
    assert_user_error(run("profile", bad, "--json", tmp_path / "p.json"), "trunc.onnx")
    assert not (tmp_path / "p.json").exists()


def test_unknown_zoo_name():
    assert_user_error(run("profile", "zoo:nope"), "unknown zoo entry 'nope'", "lenet5")


def test_zoo_data_is_not_a_model():
    assert_user_error(run("profile", "zoo:mnist"), "is a data set, expected a model")


def test_data_with_wrong_shape(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((4, 1, 32, 32), np.float32), labels=np.zeros(4, np.int64))
    out = tmp_path / "p.json"
    assert_user_error(run("profile", "zoo:lenet5", "--data", data, "--json", out), "(4, 1, 32, 32)", "should be 28")
    assert not out.exists()


def test_data_with_wrong_dtype(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((4, 1, 28, 28), np.float64))
    assert_user_error(run("profile", "zoo:lenet5", "--data", data), "dtype float64, expected float32")


def test_data_without_inputs(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 28, 28), np.float32))
    assert_user_error(run("profile", "zoo:lenet5", "--data", data), "no 'inputs' array")


def test_labels_not_matching_inputs(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((4, 1, 28, 28), np.float32), labels=np.zeros(3, np.int64))
    assert_user_error(run("profile", "zoo:lenet5", "--data", data), "'labels' has shape (3,), expected (4,)")


def test_zoo_list_and_path():
    r = run("zoo", "list")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.splitlines()]
    assert names == ["lenet5", "alexnet-mnist", "resnet-mnist", "resnet18-mnist", "mnist"]
    r = run("zoo", "path", "mnist")
    assert r.exit_code == 0
    with np.load(r.output.strip()) as z:
        assert z["inputs"].shape == (1000, 1, 28, 28)


def test_profile_lenet5_writes_json_and_plots(tmp_path):
    out, plots = tmp_path / "p.json", tmp_path / "plots"
    r = run("profile", "zoo:lenet5", "--runs", "2", "--json", out, "--plots", plots)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["model"]["macs"] == 86_400 + 153_600 + 256 * 120 + 120 * 84 + 84 * 10
    assert report["model"]["accuracy"] >= 0.97
    assert sorted(p.suffix for p in plots.iterdir()) and all(p.suffix == ".png" for p in plots.iterdir())
    assert [a["node"] for a in report["activations"]]  # every ReLU has a zero rate
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_real_process_exit_code_and_no_traceback(tmp_path):
    # cwd=tmp_path: `python -m` puts the cwd on sys.path, and the checkout's onnxzero/ is not the installed package
    p = subprocess.run([sys.executable, "-m", "onnxzero.cli.main", "profile", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip() == f"onnxzero: error: model file not found: {tmp_path / 'x.onnx'} (expected an .onnx file or zoo:NAME)"


def test_profile_of_a_rewritten_model_several_models_and_html(tmp_path):
    """A rewritten model profiles (the library is registered), several models compare side by side,
    and --html writes one self-contained page."""
    rewritten = tmp_path / "lenet-ee.onnx"
    r = run("rewrite", "zoo:lenet5", "--technique", "early-exit", "-o", rewritten)
    assert r.exit_code == 0, r.output
    r = run("profile", rewritten, "--data", zoo.path("mnist"), "--runs", "2", "--html", tmp_path / "p.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "p.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "http://" not in page.replace("http://www.w3.org", "")
    r = run("profile", "zoo:lenet5", rewritten, "--runs", "2", "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "c.json").read_text())
    assert len(table["models"]) == 2, table
    r = run("profile", "zoo:lenet5", "zoo:alexnet-mnist", "--plots", tmp_path / "plots")
    assert_user_error(r, "--plots takes one model, got several: expected one MODEL (or drop --plots)")
    assert not (tmp_path / "plots").exists()


def test_optimize_writes_html_and_a_speed_dial_model(tmp_path):
    out, rep, page = tmp_path / "l.onnx", tmp_path / "r.json", tmp_path / "r.html"
    r = run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "lazy", "--pareto",
            "--points", "3", "-o", out, "--report", rep, "--html", page)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    dial = report["speed_dial"]["points"]
    assert 2 <= len(dial) <= 3 and [p["speed"] for p in dial][0] == 0.0
    model = onnx.load(out)
    assert "speed" in [i.name for i in model.graph.input]
    html = page.read_text()
    assert all(s["node"] in html for s in report["sites"])


def test_optimize_pareto_needs_two_points_and_a_runtime_technique(tmp_path):
    r = run("optimize", "zoo:lenet5", "--eps", "3", "--pareto", "--points", "1", "-o", tmp_path / "l.onnx")
    assert_user_error(r, "--points")
    r = run("optimize", "zoo:lenet5", "--eps", "3", "--pareto", "--techniques", "sparse-quant", "-o", tmp_path / "l.onnx")
    assert_user_error(r, "--pareto")
    assert list(tmp_path.iterdir()) == []
