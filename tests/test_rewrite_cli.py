"""`onnxzero rewrite`: --explain, writing the model, and every refusal as one line with exit status 1.

Each test runs in its own tmp_path and ends by checking that no temporary file was left there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxzero import DOMAIN, zoo
from onnxzero.cli.main import cli
from onnxzero.evaluate import Evaluator, session
from onnxzero.passes.rewrite import provenance

LENET_SITES = ["/features/features.0/Conv", "/features/features.3/Conv"]


def invoke(*args: str):
    # a wide console, so rich neither wraps table cells nor long paths
    return CliRunner().invoke(cli, ["rewrite", *args], catch_exceptions=True, env={"COLUMNS": "400"})


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def one_line_error(res, *fragments: str) -> None:
    """Exit 1, and the output is exactly one 'onnxzero: error: ...' line holding every fragment."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a UserError, no traceback
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxzero: error: "), res.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def lenet_copy(tmp_path) -> Path:
    path = tmp_path / "lenet5.onnx"
    shutil.copy(zoo.path("lenet5"), path)
    return path


@pytest.fixture(scope="module")
def mnist8() -> tuple[np.ndarray, np.ndarray]:
    with np.load(zoo.path("mnist")) as z:
        return z["inputs"][:8], z["labels"][:8]


def test_explain_lists_every_conv_with_its_site(tmp_path):
    res = invoke("zoo:lenet5", "--explain")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, LENET_SITES):
        assert line.startswith(f"{name}: site -> Relu ")
    assert "x 1x28x28 -> y 6x24x24, k 5x5" in lines[0] and "0.0864M MACs" in lines[0]
    assert "input may be negative (graph input 'input', not declared non-negative)" in lines[0]
    assert "x 6x12x12 -> y 16x8x8" in lines[1] and "input non-negative (MaxPool" in lines[1]
    assert files(tmp_path) == set()


HEAD_NET = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1, 12, 12] x) => (float[N, 4, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r1 = Relu(c1)
    c2 = Conv (r1, w2)
    t = Tanh(c2)
    y = Conv (t, w3)
}"""


def test_explain_gives_the_reason_a_conv_is_not_a_site(tmp_path):
    model = onnx.parser.parse_model(HEAD_NET)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (4, 1, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (4, 4, 1, 1))):
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    res = invoke(str(path), "--explain")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("Conv: site -> Relu ")
    assert lines[1] == "Conv_1: not a site: no ReLU after it (its output goes to Tanh 'Tanh')"
    assert lines[2] == "Conv_2: not a site: its output 'y' is a graph output, which the ReLU would change"
    assert files(tmp_path) == {"m.onnx"}


def test_explain_with_output_says_what_became_of_each_site(tmp_path):
    out = tmp_path / "out.onnx"
    res = invoke("zoo:lenet5", "-o", str(out), "--technique", "early-exit", "--explain")
    assert res.exit_code == 0, res.output
    text = res.output
    assert "-> kept: exact early exit needs a non-negative input" in text
    assert '-> rewritten: early-exit {"mode": "exact"}' in text
    assert "1 of 2 sites rewritten" in text and f"wrote {out}" in text
    assert files(tmp_path) == {"out.onnx"}


def test_rewrite_writes_a_model_that_loads_and_runs(tmp_path, mnist8):
    out = tmp_path / "out.onnx"
    res = invoke("zoo:lenet5", "-o", str(out), "--technique", "early-exit")
    assert res.exit_code == 0, res.output
    assert "1 of 2 sites rewritten" in res.output and res.output.strip().endswith(f"wrote {out}")
    assert files(tmp_path) == {"out.onnx"}  # no temporary file left beside it

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("EarlyExitConv") == 1
    assert any(n.domain == DOMAIN for n in model.graph.node)
    prov = provenance(model)
    assert prov["sites"] == {LENET_SITES[1]: {"technique": "early-exit", "setting": {"mode": "exact"}}}
    original = onnx.load(zoo.path("lenet5"))
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    x, labels = mnist8
    got = session(model).run(None, {model.graph.input[0].name: x})[0]
    want = Evaluator(original).run(x).logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.mean(np.argmax(got, 1) == labels) >= 0.75


def test_rewrite_lazy_uses_the_zoo_data_by_default(tmp_path, mnist8):
    out = tmp_path / "nested" / "lazy.onnx"
    res = invoke("zoo:lenet5", "-o", str(out), "--technique", "lazy")
    assert res.exit_code == 0, res.output
    assert "2 of 2 sites rewritten" in res.output and "top_n_hit_rate=" in res.output
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node].count("LazyConv") == 2
    assert session(model).run(None, {model.graph.input[0].name: mnist8[0]})[0].shape == (8, 10)
    assert files(out.parent) == {"lazy.onnx"}


def test_rewrite_with_a_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"technique": "spatial", "sites": {LENET_SITES[0]: None,
                                                                  LENET_SITES[1]: {"mask": [[1, 1], [1, 1]]}}}))
    out = tmp_path / "out.onnx"
    res = invoke("zoo:lenet5", "-o", str(out), "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert "1 of 2 sites rewritten" in res.output and "left alone by the config" in res.output
    sites = provenance(onnx.load(out))["sites"]
    assert sites == {LENET_SITES[1]: {"technique": "spatial", "setting": {"patch": 2, "mask_shape": [2, 2],
                                                                          "mask_ones": 1.0}}}
    assert files(tmp_path) == {"c.json", "out.onnx"}


@pytest.mark.parametrize("how", ["same-path", "relative-path", "symlink"])
def test_output_equal_to_the_input_is_refused_and_the_input_kept(how, lenet_copy, tmp_path, monkeypatch):
    before = lenet_copy.read_bytes()
    out = lenet_copy
    if how == "relative-path":
        monkeypatch.chdir(tmp_path)
        out = Path("./sub/../lenet5.onnx")
        (tmp_path / "sub").mkdir()
    elif how == "symlink":
        out = tmp_path / "alias.onnx"
        out.symlink_to(lenet_copy)
    res = invoke(str(lenet_copy), "-o", str(out), "--technique", "early-exit")
    one_line_error(res, "refusing to overwrite the input", str(lenet_copy))
    assert lenet_copy.read_bytes() == before
    assert files(tmp_path) == {"lenet5.onnx"} | {"relative-path": {"sub"}, "symlink": {"alias.onnx"}}.get(how, set())


def test_output_equal_to_the_data_file_is_refused_and_the_data_kept(lenet_copy, tmp_path):
    data = tmp_path / "data.npz"
    shutil.copy(zoo.path("mnist"), data)
    before = data.read_bytes()
    res = invoke(str(lenet_copy), "-o", str(data), "--data", str(data), "--technique", "early-exit")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.strip().splitlines()[-1].startswith("onnxzero: error: refusing to overwrite the input")
    assert data.read_bytes() == before
    assert files(tmp_path) == {"lenet5.onnx", "data.npz"}


def test_output_equal_to_the_data_file_is_refused_up_front(lenet_copy, tmp_path):
    data = tmp_path / "data.npz"
    shutil.copy(zoo.path("mnist"), data)
    one_line_error(invoke(str(lenet_copy), "-o", str(data), "--data", str(data), "--technique", "early-exit"),
                   "refusing to overwrite")


@pytest.fixture
def external_data_model(tmp_path) -> Path:
    """LeNet-5 saved with its weights in external data (tmp_path/m.onnx + m.onnx.data), as dynamo exports are."""
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(zoo.path("lenet5")), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert files(tmp_path) == {"m.onnx", "m.onnx.data"}
    return path


def test_external_data_model_rewrites_to_a_self_contained_file(external_data_model, tmp_path, mnist8):
    folder = external_data_model.parent
    before = {p: (folder / p).read_bytes() for p in files(folder)}
    out = tmp_path / "out" / "r.onnx"
    res = invoke(str(external_data_model), "-o", str(out), "--technique", "early-exit", "--data", str(zoo.path("mnist")))
    assert res.exit_code == 0, res.output
    assert {p: (folder / p).read_bytes() for p in before} == before
    assert files(out.parent) == {"r.onnx"}  # one file: the weights are inside
    model = onnx.load(out)
    got = session(model).run(None, {model.graph.input[0].name: mnist8[0]})[0]
    want = Evaluator(onnx.load(zoo.path("lenet5"))).run(mnist8[0]).logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_output_onto_the_inputs_external_data_is_refused(external_data_model):
    data = external_data_model.parent / "m.onnx.data"
    before = data.read_bytes()
    res = invoke(str(external_data_model), "-o", str(data), "--technique", "early-exit")
    assert data.read_bytes() == before
    one_line_error(res, "refusing to overwrite")


def test_missing_output_without_explain_is_refused(lenet_copy, tmp_path):
    one_line_error(invoke(str(lenet_copy), "--technique", "early-exit"), "no output given", "-o OUT.onnx")
    assert files(tmp_path) == {"lenet5.onnx"}


def test_missing_technique_is_refused(tmp_path):
    one_line_error(invoke("zoo:lenet5", "-o", str(tmp_path / "o.onnx")), "no technique given")
    assert files(tmp_path) == set()


@pytest.mark.parametrize("text, fragments", [
    ("{bad", ["cannot read --config", "expected a JSON object"]),
    ("", ["cannot read --config", "expected a JSON object"]),
    ("[1, 2]", ["holds a list, expected a JSON object"]),
    ('{"technique": "lazy", "sites": {"conv9": {}}}', ["config names 'conv9', which is not a site", LENET_SITES[0]]),
    ('{"technique": "zip"}', ["technique 'zip'"]),
    ('{"technique": "lazy", "defaults": {}}', ["unknown key 'defaults'"]),
])
def test_bad_config_is_refused_in_one_line(text, fragments, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    one_line_error(invoke("zoo:lenet5", "-o", str(tmp_path / "o.onnx"), "--config", str(cfg)), *fragments)
    assert files(tmp_path) == {"c.json"}


def test_missing_config_file_is_refused(tmp_path):
    one_line_error(invoke("zoo:lenet5", "-o", str(tmp_path / "o.onnx"), "--config", str(tmp_path / "nope.json")),
                   "cannot read --config", "nope.json")
    assert files(tmp_path) == set()


def test_config_with_a_non_object_site_entry_is_refused_in_one_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"technique": "lazy", "sites": {LENET_SITES[1]: "lazy"}}))
    one_line_error(invoke("zoo:lenet5", "-o", str(tmp_path / "o.onnx"), "--config", str(cfg)), LENET_SITES[1])


def test_output_is_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    res = invoke("zoo:lenet5", "-o", str(tmp_path / "d"), "--technique", "early-exit")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.strip().splitlines()[-1].endswith("d is a directory, expected a file path")
    assert files(tmp_path) == {"d"} and files(tmp_path / "d") == set()


def test_output_is_a_directory_is_refused_up_front(tmp_path):
    (tmp_path / "d").mkdir()
    one_line_error(invoke("zoo:lenet5", "-o", str(tmp_path / "d"), "--technique", "early-exit"), "is a directory")


def _config(tmp_path):
    p = tmp_path / "half.json"
    p.write_text('{"default": {"prune": 0.5}}')
    return str(p)


def test_sparse_quant_reports_the_model_total(tmp_path):
    out = tmp_path / "sq.onnx"
    r = CliRunner().invoke(cli, ["rewrite", "zoo:lenet5", "--technique", "sparse-quant", "--config", _config(tmp_path),
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    # lenet5 has 150 + 2400 conv weights, each pruned to half by the config: %W_Z 50, CR = 100 / (50 * 16 / 32) = 4
    assert "sparse-quant, whole model: %W_Z 50.0, CR 4.00 over 2,550 conv weights" in r.output
