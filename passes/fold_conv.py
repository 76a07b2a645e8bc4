"""Fold what surrounds a Conv into its weights, bias and pads (onnxscript rewrite rules).

Each rule is a pattern, a check that returns a reason, and a rewrite. The rewritten Conv
keeps the original Conv's node name, because that name is the stable id of a site.
BatchNormalization and Pad reuse onnxscript's rules and only add the checks this
project needs; the per-channel Mul/Add rule is ours, since onnxscript's conv-affine
rule folds scalars only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp
from onnxscript.rewriter.rules.common._fuse_batchnorm import FuseBatchNormIntoConv
from onnxscript.rewriter.rules.common._fuse_pad_into_conv import FuseConvPad

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _owned_constant(value: ir.Value, owner: ir.Node) -> str | None:
    """Why `value` cannot be rewritten in place for `owner`, or None when it can."""
    if value.is_graph_input():
        return f"'{value.name}' is a graph input"
    if not value.is_initializer() or value.const_value is None:
        return f"'{value.name}' is not a constant initializer"
    # Rewritten weights keep their initializer name, so a weight shared with another
    # node would change under that node too.
    others = [user.name for user, _ in value.uses() if user is not owner]
    if others:
        return f"'{value.name}' is also used by {others[0]!r}"
    return None


class FoldBatchNormIntoConv(FuseBatchNormIntoConv):
    """BatchNormalization(Conv(x)) -> Conv(x): onnxscript's rule, inference-mode BN only."""

    def check(self, context, x, inbound_out: ir.Value, batchnorm_out: ir.Value) -> orp.MatchResult:
        result = orp.MatchResult()
        bn = batchnorm_out.producer()
        if bn.attributes.get_int("training_mode", 0):
            return result.fail(f"{bn.name}: training_mode=1 normalizes with batch statistics")
        # The weight's type, not the Conv output's: a Conv made by an earlier fold has no
        # inferred output type yet.
        if inbound_out.producer().inputs[1].dtype not in _FLOAT_TYPES:
            return result.fail(f"{inbound_out.producer().name} has no float weights")
        return super().check(context, x, inbound_out, batchnorm_out)

    def rewrite(self, op, x, inbound_out: ir.Value, batchnorm_out: ir.Value):
        name = inbound_out.producer().name
        out = super().rewrite(op, x, inbound_out, batchnorm_out)
        out.producer().name = name
        return out


class FoldPadIntoConv(FuseConvPad):
    """Conv(Pad(x)) -> Conv(x, pads += Pad's), only when the Pad feeds this Conv alone.

    onnxscript's rule also fires when the Pad output has other consumers (it keeps the
    Pad for them); we refuse that case so the padded tensor is never computed twice.
    """

    def check(self, context, x, pad: ir.Value, conv: ir.Value) -> orp.MatchResult:
        result = orp.MatchResult()
        if pad.is_graph_output():
            return result.fail(f"{pad.name} is a graph output")
        if len(pad.uses()) != 1:
            return result.fail(f"{pad.name} has {len(pad.uses())} consumers")
        return super().check(context, x, pad, conv)


class _FoldChannelAffine(orp.RewriteRuleClassBase):
    """Conv(x) (*|+) c -> Conv'(x), for a constant c that is per output channel or scalar."""

    op_type: str

    def pattern(self, op, x, c):
        return getattr(op, self.op_type)(op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"]), c)

    def check(self, context, x, c: ir.Value, conv_out: ir.Value) -> orp.MatchResult:
        del context, x
        result = orp.MatchResult()
        conv = conv_out.producer()
        cval = _const(c)
        if cval is None or c.is_graph_input():
            return result.fail(f"{c.name} is not constant")
        for v in [conv.inputs[1], *([conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] is not None else [])]:
            if (why := _owned_constant(v, conv)) is not None:
                return result.fail(why)
        w = conv.inputs[1].const_value
        # The weight's type, not the Conv output's: a Conv made by an earlier fold has no
        # inferred output type yet.
        if w.dtype not in _FLOAT_TYPES or cval.dtype != w.dtype.numpy():
            return result.fail(f"{c.name} and the weights of {conv.name} are not the same float type")
        k, rank = w.shape[0], len(w.shape)
        if cval.ndim > rank:
            return result.fail(f"{c.name} has rank {cval.ndim} > {rank}")
        full = (1,) * (rank - cval.ndim) + tuple(cval.shape)
        if full[0] != 1 or full[1] not in (1, k) or any(d != 1 for d in full[2:]):
            return result.fail(f"{c.name} of shape {tuple(cval.shape)} is not per output channel of {k}")
        return result

    def _channel_vector(self, c: ir.Value, k: int) -> np.ndarray:
        return np.broadcast_to(_const(c).reshape(-1), (k,))

    def rewrite(self, op, x, c: ir.Value, conv_out: ir.Value):
        conv = conv_out.producer()
        w_in = conv.inputs[1]
        w = w_in.const_value.numpy()
        k = w.shape[0]
        b_in = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        b = b_in.const_value.numpy() if b_in is not None else None
        w, b = self._fold(w, b, self._channel_vector(c, k))
        inputs = [x, op.initializer(ir.tensor(w.astype(w_in.dtype.numpy(), copy=False)), name=w_in.name)]
        if b is not None:
            b_name = b_in.name if b_in is not None else _fresh_name(conv.graph, f"{w_in.name}_bias")
            inputs.append(op.initializer(ir.tensor(b.astype(w_in.dtype.numpy(), copy=False)), name=b_name))
        return op.op("Conv", *inputs, _name=conv.name, **conv.attributes)

    def _fold(self, w, b, s):
        raise NotImplementedError


class FoldChannelMulIntoConv(_FoldChannelAffine):
    op_type = "Mul"

    def _fold(self, w, b, s):
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        return w, (None if b is None else b * s)


class FoldChannelAddIntoConv(_FoldChannelAffine):
    op_type = "Add"

    def _fold(self, w, b, s):
        return w, (s.copy() if b is None else b + s)


def _fresh_name(graph: ir.Graph | None, base: str) -> str:
    taken = graph.initializers if graph is not None else {}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


fold_batchnorm_rule = FoldBatchNormIntoConv.rule()
fold_pad_rule = FoldPadIntoConv.rule()
fold_mul_rule = FoldChannelMulIntoConv.rule()
fold_add_rule = FoldChannelAddIntoConv.rule()

#: Every fold into a Conv, Mul/Add in both operand orders.
CONV_FOLD_RULES = orp.RewriteRuleSet([fold_batchnorm_rule, fold_pad_rule, fold_mul_rule, fold_add_rule], commute=True)


class FoldIntoConvPass(ir.passes.InPlacePass):
    """Apply CONV_FOLD_RULES until nothing more folds (Conv->BN->Mul->Add chains fold one step a round)."""

    def __init__(self, max_rounds: int = 16):
        super().__init__()
        self.max_rounds = max_rounds
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = 0
        for _ in range(self.max_rounds):
            n = CONV_FOLD_RULES.apply_to_model(model)
            self.count += n
            if not n:
                break
        return ir.passes.PassResult(model, modified=bool(self.count))
