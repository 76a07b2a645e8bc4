"""Issue 15: the bad inputs and edge cases a user hits — no traceback, no silent wrong result, no lost file.

Each case runs the real command line (in-process through click's CliRunner, or a real process where the
operating system must take part) on small real models and real digits, and checks the exit status, the
one-line message, that no traceback appears, and that no file — above all no input — was written or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import default_sigint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from onnxzero import DOMAIN, UserError, zoo
from onnxzero.cli.main import cli
from onnxzero.emit import write_model

N = 41


def invoke(*args, columns: int = 200):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": str(columns)})


def one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("onnxzero: error: "), err
    for f in fragments:
        assert f in err, (f, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (names and bytes): what a refused command must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- small real models -------------------------------------------------------------------------

def _conv(rng, name, x, y, cin, cout, inits, k=3):
    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, pads=[k // 2] * 4)


def cnn(in_dims, *, head: str = "classes", act: str = "Relu") -> onnx.ModelProto:
    """Conv-act-Conv-act, then 10 class logits (global pool + MatMul) or a per-pixel N x 4 x H x W head."""
    rng = np.random.default_rng(0)
    inits: list = []
    nodes = [_conv(rng, "c1", "x", "a", 1, 8, inits), helper.make_node(act, ["a"], ["r1"], name="r1"),
             _conv(rng, "c2", "r1", "b", 8, 8, inits), helper.make_node(act, ["b"], ["r2"], name="r2")]
    if head == "classes":
        inits.append(numpy_helper.from_array((rng.standard_normal((8, 10)) * 0.3).astype(np.float32), "fc.w"))
        nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
                  helper.make_node("MatMul", ["f", "fc.w"], ["y"])]
        out = helper.make_tensor_value_info("y", T.FLOAT, [in_dims[0], 10])
    else:
        nodes.append(_conv(rng, "c3", "r2", "y", 8, 4, inits))
        out = helper.make_tensor_value_info("y", T.FLOAT, [in_dims[0], 4, *in_dims[2:]])
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", T.FLOAT, in_dims)], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def no_site_models() -> dict[str, onnx.ModelProto]:
    """Models whose every Conv is refused as a site: LeakyReLU only, a 1-D convolution, float16."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1, 3)).astype(np.float32), "w")
    conv1d = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="c1d", pads=[1, 1]), helper.make_node("Relu", ["a"], ["y"])],
        "m", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 1, 28])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 4, 28])], [w1])
    w16 = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float16), "w")
    fp16 = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="c16", pads=[1] * 4), helper.make_node("Relu", ["a"], ["y"])],
        "m", [helper.make_tensor_value_info("x", T.FLOAT16, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", T.FLOAT16, ["N", 4, 28, 28])], [w16])
    op17 = [helper.make_opsetid("", 17)]
    return {"leaky": cnn(["N", 1, 28, 28], act="LeakyRelu"),
            "conv1d": helper.make_model(conv1d, opset_imports=op17),
            "fp16": helper.make_model(fp16, opset_imports=op17)}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(zoo.path("mnist")) as z:
        return z["inputs"][:N].copy(), z["labels"][:N].copy()


@pytest.fixture
def work(tmp_path, digits) -> Path:
    """A folder with lenet5.onnx and digits.npz (41 real digits with labels)."""
    shutil.copy(zoo.path("lenet5"), tmp_path / "lenet5.onnx")
    np.savez(tmp_path / "digits.npz", inputs=digits[0], labels=digits[1])
    return tmp_path


def optimize_args(model, data, out, *extra, eps: float = 5):
    return ("optimize", model, "--eps", eps, "--data", data, "-o", out, "--objective", "macs", "--techniques", "lazy",
            *extra)


# --- 1. an output that is an input, however it is spelled ---------------------------------------

@pytest.mark.parametrize("command", ["rewrite", "optimize"])
def test_output_through_a_missing_folder_onto_the_input_is_refused_before_any_work(work, command):
    before = snapshot(work)
    model, data = work / "lenet5.onnx", work / "digits.npz"
    out = work / "sub" / ".." / "lenet5.onnx"  # sub/ does not exist: the path still names the input
    args = ("rewrite", model, "--technique", "spatial", "-o", out) if command == "rewrite" else \
        optimize_args(model, data, out)
    one_line_error(invoke(*args), "refusing to overwrite the input", "lenet5.onnx")
    assert snapshot(work) == before  # input unchanged, no sub/, no search cache: refused before the search
    assert not (work / "sub").exists()


def test_symlink_data_file_and_external_data_outputs_are_refused(work):
    model = onnx.load(str(work / "lenet5.onnx"))
    ext = work / "ext"
    ext.mkdir()
    onnx.save(model, str(ext / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (work / "link.onnx").symlink_to(work / "lenet5.onnx")
    before = snapshot(work)
    for model_path, out in ((work / "lenet5.onnx", work / "link.onnx"),
                            (work / "lenet5.onnx", work / "digits.npz"),
                            (ext / "m.onnx", work / "nothere" / ".." / "ext" / "m.onnx.data")):
        one_line_error(invoke("rewrite", model_path, "--technique", "lazy", "--data", work / "digits.npz", "-o", out),
                       "refusing to overwrite the input")
    assert snapshot(work) == before


# --- 3. outputs that cannot be written ----------------------------------------------------------

def test_unwritable_outputs_are_one_line_before_any_work(work):
    (work / "afile").write_text("not a folder\n")
    before = snapshot(work)
    model, data = work / "lenet5.onnx", work / "digits.npz"
    blocked = work / "afile" / "out.onnx"
    one_line_error(invoke("rewrite", model, "--technique", "lazy", "--data", data, "-o", blocked),
                   "cannot write", "is not a directory")
    one_line_error(invoke("profile", model, "--data", data, "--json", work / "afile" / "p.json"), "cannot write")
    one_line_error(invoke("profile", model, "--data", data, "--plots", work / "afile" / "plots"), "cannot write")
    # --report unwritable: refused before the search (no OUT.search.json appears beside the output)
    one_line_error(invoke(*optimize_args(model, data, work / "o.onnx", "--report", work / "afile" / "r.json")),
                   "cannot write")
    assert snapshot(work) == before


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, where no file can be created")
def test_output_in_a_folder_that_refuses_files(work):
    probe = Path("/sys/kernel/onnxzero-probe")
    try:
        probe.touch()
        probe.unlink()
        pytest.skip("this sysfs accepts new files")
    except OSError:
        pass
    before = snapshot(work)
    one_line_error(invoke("rewrite", work / "lenet5.onnx", "--technique", "spatial", "-o", "/sys/kernel/o.onnx"),
                   "cannot write /sys/kernel/o.onnx", "not writable")
    assert snapshot(work) == before


def test_write_that_fails_midway_is_one_line_and_leaves_no_partial_file(work):
    """A real failing write (the file-size limit, as a full disk would): EFBIG on the model's bytes."""
    before = snapshot(work)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        from onnxzero.cli.main import cli
        sys.argv = ["onnxzero", "rewrite", {str(work / 'lenet5.onnx')!r}, "--technique", "spatial",
                    "-o", {str(work / 'out.onnx')!r}]
        cli()
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == f"onnxzero: error: cannot write {work / 'out.onnx'}: File too large; nothing written"
    assert snapshot(work) == before  # no out.onnx, no temporary file


def test_a_model_onnxruntime_cannot_load_is_never_written(tmp_path):
    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain=DOMAIN)], "bad",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(UserError, match="does not load in onnxruntime .*; nothing written"):
        write_model(tmp_path / "bad.onnx", bad)
    assert list(tmp_path.iterdir()) == []


# --- 5. non-finite data -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_by_every_command(work, digits, bad):
    x = digits[0].copy()
    x[3, 0, 5, 5] = bad
    x[7, 0, 0, 0] = bad
    np.savez(work / "bad.npz", inputs=x, labels=digits[1])
    before = snapshot(work)
    model, data = work / "lenet5.onnx", work / "bad.npz"
    msg = ("bad.npz: 'inputs' has NaN or Inf in 2 of 41 samples (first: sample 3)", "expected finite values")
    one_line_error(invoke("rewrite", model, "--technique", "lazy", "--data", data, "-o", work / "o.onnx"), *msg)
    one_line_error(invoke(*optimize_args(model, data, work / "o.onnx")), *msg)
    one_line_error(invoke("profile", model, "--data", data, "--runs", 1), *msg)
    assert snapshot(work) == before  # no model, no search cache


# --- 6 and 7. labels, checked once for every command --------------------------------------------

def test_labels_out_of_range_are_refused_by_every_command(work, digits):
    np.savez(work / "shifted.npz", inputs=digits[0], labels=digits[1] + 10)  # 10..19 for 10 classes
    before = snapshot(work)
    model, data = work / "lenet5.onnx", work / "shifted.npz"
    lo, hi = int(digits[1].min()) + 10, int(digits[1].max()) + 10
    msg = (f"shifted.npz: labels range {lo}..{hi}, expected 0..9 for the 10 classes of model output",)
    one_line_error(invoke("rewrite", model, "--technique", "sparse-quant", "--data", data, "-o", work / "o.onnx"), *msg)
    one_line_error(invoke("profile", model, "--data", data, "--runs", 1), *msg)
    one_line_error(invoke(*optimize_args(model, data, work / "o.onnx")), *msg)
    assert snapshot(work) == before


def test_labels_for_a_per_pixel_output_say_what_is_expected(work, digits):
    onnx.save(cnn(["N", 1, 28, 28], head="pixels"), str(work / "seg.onnx"))
    np.savez(work / "unlabelled.npz", inputs=digits[0])
    before = snapshot(work)
    model, data = work / "seg.onnx", work / "digits.npz"
    msg = ("'labels' has shape (41,), but model output 'y' has shape (N, 4, 28, 28), not (N, classes)",
           "expected a data set without 'labels'")
    one_line_error(invoke(*optimize_args(model, data, work / "o.onnx")), *msg)
    one_line_error(invoke("rewrite", model, "--technique", "lazy", "--data", data, "-o", work / "o.onnx"), *msg)
    one_line_error(invoke("profile", model, "--data", data, "--runs", 1), *msg)
    assert snapshot(work) == before
    # what the message offers works: without labels the model's own per-pixel argmax is the reference
    res = invoke(*optimize_args(model, work / "unlabelled.npz", work / "o.onnx", eps=50))
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert (work / "o.onnx").is_file()


# --- 8. symbolic H and W -------------------------------------------------------------------------

def test_dynamic_hw_model_is_searched_at_the_datas_size(work):
    onnx.save(cnn(["N", 1, "H", "W"]), str(work / "dyn.onnx"))
    explain = invoke("rewrite", work / "dyn.onnx", "--explain")
    assert explain.exit_code == 0 and "MACs unknown (symbolic H/W)" in explain.output
    explained = [ln.split(":")[0] for ln in explain.output.splitlines() if ": site" in ln]
    assert explained == ["c1", "c2"]
    res = invoke(*optimize_args(work / "dyn.onnx", work / "digits.npz", work / "o.onnx", "--report", work / "r.json"))
    assert res.exit_code == 0, res.output
    report = json.loads((work / "r.json").read_text())
    assert [s["node"] for s in report["sites"]] == explained
    # the data's 28 x 28 digits: c1 is 28*28*8*1*9 MACs, c2 28*28*8*8*9
    assert [s["macs_before"] for s in report["sites"]] == [28 * 28 * 8 * 9, 28 * 28 * 64 * 9]
    out = onnx.load(str(work / "o.onnx"))
    dims = [d.dim_value or d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 1, 28, 28]  # the batch stays free; H and W are the size it was searched at


# --- 9. nothing to rewrite -------------------------------------------------------------------------

@pytest.mark.parametrize("name,verdict", [("leaky", "its output goes to LeakyRelu"),
                                          ("conv1d", "a 1-D convolution"),
                                          ("fp16", "input type is FLOAT16")])
def test_rewrite_with_no_site_says_so_and_writes_nothing(tmp_path, name, verdict):
    path = tmp_path / f"{name}.onnx"
    onnx.save(no_site_models()[name], str(path))
    before = snapshot(tmp_path)
    res = invoke("rewrite", path, "--technique", "lazy", "-o", tmp_path / "out.onnx")
    one_line_error(res, "0 sites rewritten", "nothing written", "--allow-unchanged")
    assert "not a site" in res.stdout and verdict in res.stdout  # the verdicts say why
    assert snapshot(tmp_path) == before
    res = invoke("rewrite", path, "--technique", "lazy", "-o", tmp_path / "out.onnx", "--allow-unchanged")
    assert res.exit_code == 0 and (tmp_path / "out.onnx").is_file(), res.output


def test_rewrite_with_sites_still_writes(work):
    res = invoke("rewrite", work / "lenet5.onnx", "--technique", "spatial", "-o", work / "o.onnx")
    assert res.exit_code == 0 and "2 of 2 sites rewritten" in res.output, res.output


# --- issue 12 item 5: files as a plain write makes them, names as the user wrote them -------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_honour_the_umask(work, mask):
    old = os.umask(mask)
    try:
        assert invoke("rewrite", work / "lenet5.onnx", "--technique", "spatial", "-o", work / "o.onnx").exit_code == 0
        assert invoke("profile", work / "lenet5.onnx", "--data", work / "digits.npz", "--runs", 1,
                      "--json", work / "p.json", "--plots", work / "plots").exit_code == 0
    finally:
        os.umask(old)
    written = [work / "o.onnx", work / "p.json", *sorted((work / "plots").iterdir())]
    assert len(written) > 2
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~mask)}


def folded_cells(text: str, col: int, key: int) -> set[str]:
    """The cells of column `col` of every rich table in `text`, a cell's folded lines joined again; a
    row starts at a line whose column `key` is not blank."""
    cells: list[str] = []
    for line in text.splitlines():
        parts = line.split("│")
        if len(parts) < max(col, key) + 3:
            continue
        frag, start = parts[col + 1].strip(), parts[key + 1].strip()
        if start or not cells:
            cells.append(frag)
        else:
            cells[-1] += frag
    return set(cells)


def test_terminal_tables_never_cut_names(work):
    convs, relus = ["/features/features.0/Conv", "/features/features.3/Conv"], ["/features/features.1/Relu"]
    model, data = work / "lenet5.onnx", work / "digits.npz"
    for columns in (80, 250):
        prof = invoke("profile", model, "--data", data, "--runs", 1, columns=columns)
        rew = invoke("rewrite", model, "--technique", "lazy", "--data", data, "-o", work / "o.onnx", columns=columns)
        assert prof.exit_code == 0 and rew.exit_code == 0, (prof.output, rew.output)
        assert "…" not in prof.output + rew.output
        assert set(convs) <= folded_cells(rew.output, 0, 1)  # rewrite's site column
        assert set(convs + relus) <= folded_cells(prof.output, 1, 0)  # profile's node table: '#', node, ...


# --- the fuzz: the CLI's data loading -------------------------------------------------------------

def _valid(x: np.ndarray, y: np.ndarray | None) -> bool:
    ok_x = x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 28, 28) and len(x) > 0 \
        and bool(np.isfinite(x).all())
    ok_y = y is None or (y.dtype.kind in "iu" and y.shape == (len(x),) and (y.size == 0 or (y.min() >= 0 and y.max() <= 9)))
    return ok_x and ok_y


@st.composite
def datasets(draw):
    n = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16, np.int64, np.uint8]))
    shape = draw(st.sampled_from([(n, 1, 28, 28), (n, 1, 28, 28), (n, 3, 28, 28), (n, 1, 27, 28), (n, 28, 28),
                                  (n, 1, 28, 28, 1), (n,), (0, 1, 28, 28)]))
    x = np.random.default_rng(draw(st.integers(0, 9))).random(shape).astype(dtype)
    poison = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
    if poison is not None and x.size and x.dtype.kind == "f":
        x.reshape(-1)[draw(st.integers(0, x.size - 1))] = poison
    labels = draw(st.sampled_from(["none", "good", "good", "range", "negative", "float", "bool", "shape", "2d"]))
    m = max(len(x), 1)
    y = {"none": None, "good": np.arange(len(x), dtype=np.int64) % 10,
         "range": np.full(len(x), 10, np.int32), "negative": np.full(len(x), -1, np.int64),
         "float": np.zeros(len(x), np.float32), "bool": np.zeros(len(x), bool),
         "shape": np.zeros(m + 1, np.int64), "2d": np.zeros((m, 1), np.uint8)}[labels]
    return x, y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets(), command=st.sampled_from(["rewrite", "rewrite", "profile"]))
def test_fuzz_data_loading_gives_one_line_errors_or_correct_results(tmp_path, data, command):
    """Whatever the .npz holds, each command that reads data either runs right or says what is wrong in one line."""
    x, y = data
    path = tmp_path / "fuzz.npz"
    np.savez(path, inputs=x, **({} if y is None else {"labels": y}))
    if command == "rewrite":
        res = invoke("rewrite", "zoo:lenet5", "--explain", "--data", path)
    else:
        res = invoke("profile", "zoo:lenet5", "--data", path, "--runs", 1, "--json", tmp_path / "p.json")
    assert "Traceback" not in res.output
    if _valid(x, y):
        assert res.exit_code == 0, res.output
        if command == "rewrite":
            assert res.output.count(": site") == 2  # lenet's two sites, as without data
        else:
            report = json.loads((tmp_path / "p.json").read_text())
            assert report["model"]["samples"] == len(x)
            if y is not None:  # top-1 over exactly these samples, as onnxruntime computes it
                import onnxruntime as ort

                sess = ort.InferenceSession(str(zoo.path("lenet5")), providers=["CPUExecutionProvider"])
                logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
                assert report["model"]["accuracy"] == pytest.approx(np.mean(np.argmax(logits, 1) == y))
    else:
        one_line_error(res)
        assert not (tmp_path / "p.json").exists()
    (tmp_path / "p.json").unlink(missing_ok=True)


# --- what holds today stays covered: Ctrl-C, then --resume ------------------------------------------

def test_ctrl_c_keeps_the_cache_and_resume_gives_the_same_model(tmp_path):
    import signal
    import time

    args = ["optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs"]
    fresh = tmp_path / "fresh.onnx"
    assert invoke(*args, "-o", fresh).exit_code == 0
    out = tmp_path / "l.onnx"
    cache = tmp_path / "l.onnx.search.json"
    p = subprocess.Popen([sys.executable, "-m", "onnxzero.cli.main", *args, "-o", str(out)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not cache.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the search finished before the signal arrived")
    assert p.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == "onnxzero: interrupted"
    assert "rerun with --resume" in stdout and not out.exists() and cache.exists()
    json.loads(cache.read_text())  # the kept cache is whole (written atomically)
    res = invoke(*args, "-o", out, "--resume")
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == fresh.read_bytes()
