"""`onnxzero bench ops`: the ResNet-18/MNIST shapes and the in-context (three-conv chain) rows.

No timing is asserted (ratios are only reported); what is asserted: the shapes, which layers get a
chain, that the chain of onnxzero ops computes what onnxruntime's chain of Conv+Relu computes at the
no-skip setting, and that the records and the JSON carry the chain fields.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from onnxzero.bench.common import LAYERS, RESNET18_MNIST, chain_for
from onnxzero.bench.ops import build_chain, discover, render_table, run_ops_bench
from onnxzero.ops import make_session


def _layer(name):
    return next(layer for layer in LAYERS if layer.name == name)


def test_resnet18_mnist_shapes_are_bench_layers():
    dims = {(l.C, l.K, l.H, l.W, l.KH, l.KW, l.stride, l.pad) for l in map(_layer, RESNET18_MNIST)}
    assert dims == {(64, 64, 28, 28, 3, 3, 1, 1), (128, 128, 14, 14, 3, 3, 1, 1), (256, 256, 7, 7, 3, 3, 1, 1),
                    (512, 512, 4, 4, 3, 3, 1, 1), (1, 64, 28, 28, 3, 3, 1, 1), (64, 64, 56, 56, 3, 3, 1, 1)}
    assert len({layer.name for layer in LAYERS}) == len(LAYERS)


def test_which_layers_are_chained():
    for name in RESNET18_MNIST:
        chain = chain_for(_layer(name))
        assert chain is not None and len(chain) == 3
        for a, b in zip(chain, chain[1:]):  # each conv's output is the next one's input
            assert (a.K, a.H // a.stride, a.W // a.stride) == (b.C, b.H, b.W)
    assert [layer.name for layer in chain_for(_layer("3x3 1->64 28x28"))] == \
        ["3x3 1->64 28x28", "3x3 64x28x28", "3x3 64x28x28"]
    assert chain_for(_layer("3x3 64x28x28")) == [_layer("3x3 64x28x28")] * 3
    # only the ResNet-18/MNIST shapes are chained (the default bench stays short)
    for layer in LAYERS:
        assert (chain_for(layer) is not None) == (layer.name in RESNET18_MNIST)


def test_default_run_is_the_targets_skips_on_every_layer():
    from onnxzero.bench.common import DEFAULT_SKIPS
    from onnxzero.bench.ops import TARGETS

    assert {s for t in TARGETS.values() for s in t} <= set(DEFAULT_SKIPS)


@pytest.mark.parametrize("op", sorted(discover()))
@pytest.mark.parametrize("layer", ["3x3 512x4x4", "3x3 1->64 28x28"])
def test_chain_equals_onnxruntime_chain_at_zero_skip(op, layer):
    """Three ops back to back vs three Conv+Relu in onnxruntime (its NCHWc path): same output."""
    layers = chain_for(_layer(layer))
    op_model, op_feeds, ref_model, ref_feeds, dense = build_chain(discover()[op], layers, 0.0, seed=3)
    assert sum(1 for n in op_model.graph.node if n.op_type == op) == 3
    assert [n.op_type for n in ref_model.graph.node] == ["Conv", "Relu"] * 3
    out = make_session(op_model, threads=2).run(None, op_feeds)
    names = [o.name for o in op_model.graph.output]
    y = out[0]
    (ref,) = make_session(ref_model, threads=2, library=False).run(None, ref_feeds)
    assert y.shape == ref.shape == (1, layers[-1].K, layers[-1].H, layers[-1].W)
    scale = float(np.abs(ref).max())
    assert scale > 0 and (ref > 0).mean() > 0.05  # a chain that did not die out
    # sparse-quant's reference is the dequantized weights: same math, other summation order
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4 * scale)
    macs = sum(int(v) for n, v in zip(names, out) if n.endswith("macs"))
    if op in ("SparseQuantConv", "EarlyExitConv"):
        # weights that quantize to 0; exact early exit still stops the few outputs that end <= 0 on
        # the previous op's (bias-shifted) output: the output is unchanged either way
        assert 0.9 * dense <= macs <= dense
    else:
        assert macs == dense


def test_chain_of_a_skipping_op_really_skips():
    """SpatialConv's chain at 50%: built on the input each op really sees, it reaches about 50%."""
    layers = chain_for(_layer("3x3 128x14x14"))
    op_model, op_feeds, _, _, dense = build_chain(discover()["SpatialConv"], layers, 0.5, seed=4)
    out = make_session(op_model, threads=2).run(None, op_feeds)
    names = [o.name for o in op_model.graph.output]
    per_op = [int(v) for n, v in zip(names, out) if n.endswith("macs")]
    assert len(per_op) == 3
    assert abs(1 - sum(per_op) / dense - 0.5) < 0.05


def test_records_table_and_json_have_chain_rows(tmp_path):
    records = run_ops_bench(ops=["spatial", "ConvRelu"], layers=["512x4x4", "1x1 256->64"], skips=[0.0, 0.5],
                            runs=2, threads=1)
    by = {(r["op"], r["layer"], r["skip_target"]): r for r in records}
    assert set(by) == {("SpatialConv", "3x3 512x4x4", 0.0), ("SpatialConv", "3x3 512x4x4", 0.5),
                       ("ConvRelu", "3x3 512x4x4", 0.0), ("SpatialConv", "1x1 256->64 56x56", 0.0),
                       ("SpatialConv", "1x1 256->64 56x56", 0.5), ("ConvRelu", "1x1 256->64 56x56", 0.0)}
    for r in records:
        assert "error" not in r and "chain_error" not in r, r
        assert r["ratio_p25"] > 0
        if r["layer"] == "3x3 512x4x4":
            assert {"chain_ratio", "chain_op_ms", "chain_ort_ms", "chain_skip", "chain_layers", "chain_ratio_p25",
                    "chain_ratio_min"} <= set(r)
            assert r["chain_ratio"] > 0 and r["chain_layers"] == ["3x3 512x4x4"] * 3
            # ConvRelu and SpatialConv take blocked tensors (512 channels; the op spec declares their
            # layout attributes): the chain is also timed as deployed, blocked between the ops
            assert "chain_blocked_ratio" in r
            if r["op"] in ("ConvRelu", "SpatialConv"):
                assert r["chain_blocked_ratio"] > 0 and r["chain_blocked_ratio_p25"] > 0
        else:  # no chain for a channel-changing layer
            assert not any(k.startswith("chain") for k in r)
    assert by[("SpatialConv", "3x3 512x4x4", 0.0)]["chain_skip"] == 0.0
    assert by[("SpatialConv", "3x3 512x4x4", 0.5)]["chain_skip"] > 0.3
    out = io.StringIO()
    render_table(records, Console(file=out, width=200))
    assert "chain 0." in out.getvalue() or "chain 1." in out.getvalue() or "chain 2." in out.getvalue()
    assert "blocked " in out.getvalue()
    # no chain: the op-alone numbers only
    solo = run_ops_bench(ops=["ConvRelu"], layers=["512x4x4"], skips=[0.0], runs=2, threads=1, chain=False)
    assert "chain_ratio" not in solo[0] and solo[0]["ratio"] > 0


def test_cli_bench_ops_json_carries_the_chain_ratio(tmp_path):
    from onnxzero.cli.main import cli

    path = tmp_path / "ops.json"
    res = CliRunner().invoke(cli, ["bench", "ops", "--op", "ConvRelu", "--layer", "512x4x4", "--runs", "5",
                                   "--threads", "1", "--json", str(path)])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(path.read_text())
    assert rec["layer"] == "3x3 512x4x4" and rec["chain_ratio"] > 0 and rec["chain_layers"] == ["3x3 512x4x4"] * 3
    res = CliRunner().invoke(cli, ["bench", "ops", "--op", "ConvRelu", "--layer", "512x4x4", "--runs", "5",
                                   "--threads", "1", "--no-chain", "--json", str(path)])
    assert res.exit_code == 0, res.output
    assert "chain_ratio" not in json.loads(path.read_text())[0]
