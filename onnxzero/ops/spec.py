"""The op spec: one declaration per onnxzero op, read by Python and (as a generated header) by C++.

`spec.json` beside this file declares each op's inputs (order, element type, optional, constant
initializer or run-time tensor, whether the search feeds it as a setting), its attributes with
defaults, and the constants both sides share. At build time runtime_ops/cmake/gen_op_spec.py
writes it as `op_spec.h`, from which the kernels take their registration (input types, optional
flags) and input indices; here `OPS[name].node(...)` builds every onnxzero node, so an input is
added or renamed in one place and a misspelt input or attribute fails where the node is made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from onnxzero._domain import DOMAIN

_DTYPES = {"float": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64, "int8": onnx.TensorProto.INT8,
           "uint8": onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class Input:
    name: str
    dtype: str          # key of _DTYPES
    source: str         # "constant" (an initializer, read at session creation), "runtime" or "either"
    optional: bool = False
    setting: bool = False  # a per-site setting the search may feed at run time

    @property
    def onnx_type(self) -> int:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str           # int, float, string, ints
    default: Any = None  # None: no default (required, or derived by the kernel: see doc)
    required: bool = False
    values: tuple | None = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    inputs: tuple[Input, ...]
    attributes: dict[str, Attribute]

    def index(self, input_name: str) -> int:
        for i, x in enumerate(self.inputs):
            if x.name == input_name:
                return i
        raise KeyError(f"{self.name} has no input {input_name!r}, expected one of {', '.join(x.name for x in self.inputs)}")

    @property
    def settings(self) -> tuple[Input, ...]:
        return tuple(x for x in self.inputs if x.setting)

    def node(self, inputs: Mapping[str, str | None], outputs: Sequence[str], *, name: str,
             **attributes: Any) -> onnx.NodeProto:
        """The node with `inputs` (input name -> tensor name; None or "" = absent) in the declared
        order: an absent optional input before a present one is "", trailing absent ones are left
        out. Attributes given as None are left out (the kernel's default applies)."""
        unknown = set(inputs) - {x.name for x in self.inputs}
        if unknown:
            raise ValueError(f"{self.name} has no input {sorted(unknown)[0]!r}, "
                             f"expected some of {', '.join(x.name for x in self.inputs)}")
        names = [inputs.get(x.name) or "" for x in self.inputs]
        for x, v in zip(self.inputs, names):
            if not v and not x.optional:
                raise ValueError(f"{self.name}: input {x.name!r} is required")
        while names and not names[-1]:
            names.pop()
        bad = set(attributes) - set(self.attributes)
        if bad:
            raise ValueError(f"{self.name} has no attribute {sorted(bad)[0]!r}, "
                             f"expected some of {', '.join(self.attributes)}")
        attrs = {k: v for k, v in attributes.items() if v is not None}
        for a in self.attributes.values():
            if a.required and a.name not in attrs:
                raise ValueError(f"{self.name}: attribute {a.name!r} is required")
        if len(outputs) > 2:
            raise ValueError(f"{self.name} has outputs Y and macs, got {len(outputs)}")
        return helper.make_node(self.name, list(names), list(outputs), name=name, domain=DOMAIN, **attrs)


def setting_input(site: str, input_name: str) -> str:
    """The graph input through which the search (and a deployed speed dial) feeds a site's setting."""
    return f"{site}__{input_name}"


def _load() -> tuple[dict[str, OpSpec], dict[str, Any], dict[str, Attribute]]:
    raw = json.loads((Path(__file__).with_name("spec.json")).read_text())
    conv = {k: Attribute(k, v["type"], v.get("default")) for k, v in raw["conv_attributes"].items()}
    ops = {}
    for name, o in raw["ops"].items():
        ins = tuple(Input(x["name"], x["type"], x["source"], x.get("optional", False), x.get("setting", False))
                    for x in o["inputs"])
        attrs = dict(conv)
        attrs.update({k: Attribute(k, v["type"], v.get("default"), v.get("required", False),
                                   tuple(v["values"]) if "values" in v else None)
                      for k, v in o["attributes"].items()})
        ops[name] = OpSpec(name, o["doc"], ins, attrs)
    consts = {k: (tuple(v["value"]) if isinstance(v["value"], list) else v["value"]) for k, v in raw["constants"].items()}
    return ops, consts, conv


OPS, CONSTANTS, CONV_ATTRIBUTES = _load()
