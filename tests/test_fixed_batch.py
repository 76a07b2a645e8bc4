"""Models as users export them: torch.onnx.export without dynamic axes fixes the batch (1 or any size).

Every command runs such a model on a data set whose size is no multiple of that batch (41 digits):
the data goes in chunks of the fixed batch, the last one padded, and the emitted model keeps its batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxzero import zoo
from onnxzero.cli.main import cli
from onnxzero.evaluate import Evaluator, fixed_batch
from onnxzero.passes.rewrite import rewrite

EXPORTS = [("torchscript", 1), ("torchscript", 4), ("dynamo", 1), ("dynamo", 4)]
N = 41  # no multiple of 4: the last chunk is padded


def _net():
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
            self.fc = nn.Linear(16 * 14 * 14, 10)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            return self.fc(torch.flatten(x, 1))  # dynamo bakes the batch into this Reshape

    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, int], Path]:
    import torch

    net, out = _net(), tmp_path_factory.mktemp("fixed_batch")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exporter, b in EXPORTS:
            path = out / f"{exporter}_b{b}.onnx"
            x = torch.randn(b, 1, 28, 28)
            if exporter == "torchscript":
                torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
            else:
                torch.onnx.export(net, (x,), dynamo=True, verbose=False).save(str(path))
            paths[exporter, b] = path
    return paths


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    with np.load(zoo.path("mnist")) as z:
        x, y = z["inputs"][:N], z["labels"][:N]
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, inputs=x, labels=y)
    return path


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200"})


def ok(res) -> None:
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output


def input_dims(path: Path) -> list[int | str]:
    m = onnx.load(str(path))
    return [d.dim_value or d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("exporter,batch", EXPORTS)
def test_fixed_batch_export_through_every_command(exports, digits, tmp_path, exporter, batch):
    model = exports[exporter, batch]
    assert input_dims(model) == [batch, 1, 28, 28]  # the export really fixed the batch
    before = model.read_bytes()

    ok(invoke("profile", model, "--data", digits, "--runs", 1))

    rewritten = tmp_path / "lazy.onnx"
    ok(invoke("rewrite", model, "--technique", "lazy", "--data", digits, "-o", rewritten))
    assert input_dims(rewritten) == [batch, 1, 28, 28]

    optimized = tmp_path / "opt.onnx"
    ok(invoke("optimize", model, "--data", digits, "--eps", 5, "--objective", "macs", "--techniques", "lazy,spatial",
              "-o", optimized))
    assert input_dims(optimized) == [batch, 1, 28, 28]
    with np.load(digits) as z:  # the emitted model runs at its batch over every sample
        got = Evaluator(onnx.load(str(optimized))).run(z["inputs"]).logits
    assert got.shape == (N, 10) and np.isfinite(got).all()
    assert model.read_bytes() == before


@pytest.mark.parametrize("technique", ["lazy", "spatial", "early-exit"])
def test_padded_chunks_give_the_dynamic_models_logits_and_macs(exports, digits, technique):
    """Padding is dropped exactly: same logits and per-sample MACs as the model with a dynamic batch."""
    fixed = onnx.load(str(exports["torchscript", 4]))
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(fixed)
    d0 = dynamic.graph.input[0].type.tensor_type.shape.dim[0]
    d0.Clear()
    d0.dim_param = "N"
    with np.load(digits) as z:
        x, y = z["inputs"], z["labels"]
    config = {"technique": technique, "default": {"ratio": 0.5} if technique == "lazy" else {}}
    got, want = [Evaluator(rewrite(m, config=config, inputs=x, labels=y)[0]).run(x) for m in (fixed, dynamic)]
    assert fixed_batch(fixed) == 4 and fixed_batch(dynamic) is None
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert got.site_macs.values() and list(got.site_macs.values()) == list(want.site_macs.values())
    assert got.macs == want.macs > 0


def test_spatial_size_mismatch_is_one_line_naming_both_shapes(exports, tmp_path):
    data = tmp_path / "big.npz"
    np.savez(data, inputs=np.zeros((8, 1, 32, 32), np.float32))
    out = tmp_path / "o.onnx"
    for args in (("rewrite", exports["dynamo", 1], "--technique", "lazy", "--data", data, "-o", out),
                 ("optimize", exports["dynamo", 1], "--eps", 1, "--data", data, "-o", out),
                 ("profile", exports["dynamo", 1], "--data", data)):
        res = invoke(*args)
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output
        line = res.stderr.strip()
        assert "\n" not in line and "(8, 1, 32, 32)" in line and "(N, 1, 28, 28)" in line, line
        assert not out.exists()


def test_dynamic_batch_that_only_runs_at_one_falls_back_to_single_samples(digits, tmp_path):
    """An export declaring a dynamic batch but reshaping to [1, -1] (x.view(1, -1) in torch)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((8 * 28 * 28, 10)) * 0.01).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="r1"),
             helper.make_node("Reshape", ["r", "shape"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["N", 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with np.load(digits) as z:
        x = z["inputs"]
    r = Evaluator(model).run(x)
    one_by_one = np.concatenate([Evaluator(model).run(x[i:i + 1]).logits for i in range(len(x))])
    np.testing.assert_allclose(r.logits, one_by_one, rtol=1e-6)
    path = tmp_path / "view1.onnx"
    onnx.save(model, str(path))
    ok(invoke("optimize", path, "--data", digits, "--eps", 5, "--objective", "macs", "--techniques", "lazy",
              "-o", tmp_path / "o.onnx"))
