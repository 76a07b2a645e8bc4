"""profile names nodes as normalize does and finds sites with the rewrite's site finder, so the site
names `onnxzero profile` prints are the keys `onnxzero rewrite --config` takes (issue 13 item 2)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxzero.cli.main import cli
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import provenance
from onnxzero.passes.sites import find_sites
from onnxzero.profile import profile_model


def unnamed_model() -> onnx.ModelProto:
    """Unnamed Convs, Relus and Adds; a weight computed by an unnamed Constant node (folded away by
    both); a node already named 'Conv_1' that the second unnamed Conv's generated name collides with;
    a residual site (Conv -> Add(shortcut) -> Relu) and a Conv whose output is used twice (no site)."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    w2 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s2"]),  # residual: the shortcut is r1
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="Conv_1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"]),  # used twice below: not a site
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("Add", ["c4", "r4"], ["s4"]),
        helper.make_node("GlobalAveragePool", ["s4"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [w("w1", 4, 3, 3, 3), w("w3", 4, 4, 3, 3), w("w4", 4, 4, 1, 1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_profile_site_names_are_the_rewrite_config_keys(tmp_path):
    model = unnamed_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = profile_model(path, runs=1)
    names = [s.node for s in report.sites]
    # the collision: the second unnamed Conv is named 'Conv_1' first, the named one then 'Conv_1_1'
    assert names == ["Conv", "Conv_1", "Conv_1_1"]
    assert [s.relu for s in report.sites] == ["Relu", "Relu_1", "Relu_2"]
    assert [s.name for s in find_sites(normalize(model)[0])] == names

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"technique": "spatial", "sites": {n: {"patch": 2} for n in names}}))
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(cli, ["rewrite", str(path), "--config", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(provenance(onnx.load(out))["sites"]) == sorted(names)


def test_profile_site_of_a_residual_add_counts_the_add_in_its_time_share(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(unnamed_model(), path)
    report = profile_model(path, runs=1)
    node = {n.name: n for n in report.nodes}
    site = next(s for s in report.sites if s.node == "Conv_1")  # Conv -> Add -> Relu
    assert site.relu == "Relu_1"
    assert site.time_share == node["Conv_1"].time_share + node["Add"].time_share + node["Relu_1"].time_share
    assert site.macs == 8 * 8 * 4 * 4 * 3 * 3  # OH*OW*K*C*KH*KW at batch 1


def test_effectual_macs_names_layers_as_profile_does(tmp_path):
    from onnxzero.profile.effectual import effectual_macs

    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(unnamed_model(), path)
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    layers = [x.node for x in effectual_macs(path, data=data).layers]
    assert layers == ["Conv", "Conv_1", "Conv_1_1", "Conv_2"]
    assert set(layers) <= {n.name for n in profile_model(path, runs=1).nodes}
