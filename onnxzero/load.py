"""Load: turn what the user named (a path or zoo:NAME) into a checked ModelProto.

Every failure here is the user's input, so each becomes a one-line UserError.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxzero import zoo
from onnxzero.errors import UserError


def resolve_model_path(spec: str | Path) -> Path:
    spec = str(spec)
    if spec.startswith(zoo.PREFIX):
        e = zoo.entry(spec)
        if e.kind != "model":
            raise UserError(f"zoo entry '{e.name}' is a data set, expected a model")
        return zoo.path(spec)
    p = Path(spec)
    if not p.exists():
        raise UserError(f"model file not found: {p} (expected an .onnx file or zoo:NAME)")
    if not p.is_file():
        raise UserError(f"model path is not a file: {p} (expected an .onnx file)")
    return p


def load_model(spec: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and sanity-check a model; raise UserError naming what is wrong."""
    p = resolve_model_path(spec)
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:  # protobuf raises several types for garbage input
        raise UserError(f"{p} is not a valid ONNX model ({type(e).__name__}): expected an ONNX protobuf file") from None
    if not model.graph.node or not model.graph.output:
        raise UserError(f"{p} is not a valid ONNX model: expected a graph with nodes and outputs, got an empty graph")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p} failed the ONNX checker: {first}") from None
    return model


def input_files(spec: str | Path) -> tuple[Path, ...]:
    """The model file and every external-data file it references: the files no output may replace."""
    p = resolve_model_path(spec)
    files = [p]
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:
        return tuple(files)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                files.append(p.parent / kv.value)
    return tuple(dict.fromkeys(files))


def check_output_path(output: str | Path, protect: tuple[Path, ...]) -> Path:
    """Refuse, before any work, an output that is a directory or would replace an input file."""
    out = Path(output)
    if out.is_dir():
        raise UserError(f"output path {out} is a directory, expected a file path")
    for p in protect:
        if out.exists() and p.exists() and out.resolve() == p.resolve():
            raise UserError(f"refusing to overwrite the input {p}: expected a different output path")
    return out
