"""Write op_spec.h from onnxzero/ops/spec.json: the kernels' half of the one op spec.

Run by CMake at build time (stdlib only: the build may run in an isolated environment without
numpy or onnx). Per op: its name, an enum of input indices (kX, kW, ..., kInputCount), the input
table ConvOpDef registers (element type, optional), and each attribute's default; then the shared
constants. Usage: gen_op_spec.py SPEC_JSON OUT_HEADER
"""

import json
import re
import sys

TYPES = {"float": "ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT", "int64": "ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64",
         "int8": "ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8", "uint8": "ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8"}


def camel(name: str) -> str:
    """pred_W -> PredW, x_blocked -> XBlocked, X -> X."""
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"_", name) if p)


def literal(kind: str, value) -> tuple[str, str] | None:
    if value is None:
        return None
    if kind == "int":
        return "int64_t", f"{int(value)}"
    if kind == "float":
        return "float", f"{float(value)!r}f"
    if kind == "string":
        return "const char*", json.dumps(value)
    if kind in ("ints", "floats"):
        return None  # lists: the kernels' ConvAttrs hold them
    raise ValueError(kind)


def main(src: str, out: str) -> None:
    spec = json.load(open(src))
    lines = ["// Generated from onnxzero/ops/spec.json by runtime_ops/cmake/gen_op_spec.py: do not edit.",
             "#pragma once", "", "#include <cstddef>", "#include <cstdint>", "", '#include "onnxruntime_c_api.h"', "",
             "namespace oz::spec {", "",
             "struct InputDecl {", "  const char* name;", "  ONNXTensorElementDataType type;", "  bool optional;",
             "  bool constant;  // must be an initializer (read when the session is created)", "};", ""]
    for name, op in spec["ops"].items():
        ins = op["inputs"]
        lines += [f"// {op['doc']}", f"namespace {name} {{", f'inline constexpr const char* kName = "{name}";',
                  "enum Input : size_t { " + ", ".join(f"k{camel(x['name'])} = {i}" for i, x in enumerate(ins))
                  + f", kInputCount = {len(ins)} }};",
                  "inline constexpr InputDecl kInputs[] = {"]
        for x in ins:
            lines.append(f'    {{"{x["name"]}", {TYPES[x["type"]]}, {str(x.get("optional", False)).lower()}, '
                         f'{str(x["source"] == "constant").lower()}}},')
        lines.append("};")
        for a, d in op["attributes"].items():
            lit = literal(d["type"], d.get("default"))
            if lit:
                lines.append(f"inline constexpr {lit[0]} k{camel(a)}Default = {lit[1]};")
        lines += [f"}}  // namespace {name}", ""]
    lines.append("namespace constants {")
    for c, d in spec["constants"].items():
        if d["type"] == "floats":
            lines.append(f"inline constexpr double k{camel(c)}[] = {{{', '.join(repr(float(v)) for v in d['value'])}}};")
        else:
            lines.append(f"inline constexpr double k{camel(c)} = {float(d['value'])!r};")
    lines += ["}  // namespace constants", "", "}  // namespace oz::spec", ""]
    text = "\n".join(lines)
    try:
        if open(out).read() == text:
            return  # unchanged: keep the timestamp, so nothing recompiles
    except OSError:
        pass
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
