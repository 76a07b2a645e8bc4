"""normalize and find sites as onnx_ir passes (requires / ensures, one PassManager), the IR model
handed from normalize to the site finder, and emit's provenance and frozen settings (issue 13 item 2)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzero.emit import freeze_settings, provenance, set_provenance
from onnxzero.errors import UserError
from onnxzero.passes.normalize import NameNodesPass, normalize, normalize_ir, run_passes
from onnxzero.passes.rewrite import rewrite
from onnxzero.passes.sites import FindSitesPass, find_sites


def two_site_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_find_sites_pass_requires_named_nodes():
    m = ir.serde.deserialize_model(two_site_model())
    with pytest.raises(ir.passes.PreconditionError) as e:
        FindSitesPass()(m)
    assert str(e.value.__cause__) == "node 0 (Conv) has no name; expected every node named (normalize's NameNodesPass)"
    run_passes([NameNodesPass()], m)
    finder = FindSitesPass()
    assert finder(m).modified is False
    assert [s.name for s in finder.sites] == ["Conv", "Conv_1"]


@pytest.mark.parametrize("name", ["resnet50", "shufflenet", "squeezenet"])
def test_the_ir_model_normalize_hands_on_finds_the_sites_of_the_serialized_one(name, light_model):
    """rewrite finds sites on normalize's IR model, without a protobuf round trip: the same sites."""
    model = light_model(name)
    m, report = normalize_ir(model)
    finder = FindSitesPass()
    run_passes([finder], m)
    assert finder.sites == find_sites(normalize(model)[0])
    assert len(finder.sites) > 0 and report.opset_from == 9 and report.opset_to == 17


def test_a_user_error_inside_the_pass_manager_comes_out_as_it_is():
    class Refuse(ir.passes.InPlacePass):
        def call(self, model):
            raise UserError("normalize: refused, expected something else")

    with pytest.raises(UserError, match="^normalize: refused, expected something else$"):
        run_passes([NameNodesPass(), Refuse()], ir.serde.deserialize_model(two_site_model()))


def test_frozen_settings_are_constants_and_the_lazy_ratio_stays_an_input():
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    cfg = {"sites": {"Conv": {"technique": "spatial", "patch": 2}, "Conv_1": {"technique": "lazy", "ratio": 0.5}}}
    live, _ = rewrite(two_site_model(), config=cfg, inputs=x)
    frozen, _ = rewrite(two_site_model(), config=cfg, inputs=x, runtime_settings=False)
    assert [i.name for i in live.graph.input] == ["x", "Conv__mask", "Conv_1__ratio"]
    assert [i.name for i in frozen.graph.input] == ["x", "Conv_1__ratio"]
    inits = {t.name: numpy_helper.to_array(t) for t in frozen.graph.initializer}
    np.testing.assert_array_equal(inits["Conv__mask"], [[1, 0], [0, 1]])  # the default diagonal 2x2 mask
    assert provenance(frozen) == provenance(live)


def test_freeze_settings_refuses_a_name_without_default():
    model = two_site_model()
    with pytest.raises(ValueError, match="^freeze_settings: 'x' has no default value"):
        freeze_settings(model, ["x"])


def test_provenance_keeps_the_sites_of_an_earlier_rewrite():
    model = two_site_model()
    assert provenance(model) is None
    set_provenance(model, {"a": {"technique": "lazy", "setting": {"ratio": 0.5}}})
    set_provenance(model, {"b": {"technique": "spatial", "setting": {"patch": 2}}})
    prov = provenance(model)
    assert prov["sites"] == {"a": {"technique": "lazy", "setting": {"ratio": 0.5}},
                             "b": {"technique": "spatial", "setting": {"patch": 2}}}
    assert [p.key for p in model.metadata_props] == ["onnxzero"]
