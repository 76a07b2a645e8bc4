"""Load: turn what the user named (a path or zoo:NAME) into a checked ModelProto.

Every failure here is the user's input, so each becomes a one-line UserError.
"""

from __future__ import annotations

import os
import tempfile
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
    """The resolved output path; refuse, before any work and creating nothing, an output that is a
    directory, would replace an input file (the model, its external data, the data set), or cannot
    be written (read-only file system, no permission, a file where a folder should be).

    Paths are compared after realpath, so `sub/../model.onnx` (sub/ missing) or a symlink is the
    file it names.
    """
    out = Path(os.path.realpath(output))
    if out.is_dir():
        raise UserError(f"output path {output} is a directory, expected a file path")
    for p in protect:
        if out == Path(os.path.realpath(p)):
            raise UserError(f"refusing to overwrite the input {p} with output {output}: expected a different output path")
    _check_writable(out, output)
    return out


def _check_writable(out: Path, given: str | Path) -> None:
    folder = out.parent
    while not folder.exists():  # the folders a write would create: the nearest existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {given}: {folder} is not a directory")
    if out.exists() and not out.is_file():
        raise UserError(f"cannot write {given}: it exists and is not a regular file")
    try:  # a probe file, not os.access: root passes access() on read-only mounts and pseudo file systems
        fd, probe = tempfile.mkstemp(prefix=".onnxzero-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {given}: {folder} is not writable ({e.strerror or type(e).__name__})") from None
