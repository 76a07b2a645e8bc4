"""Emit: what makes a model deployable, and every file onnxzero writes, atomically.

A deployable model carries its provenance (metadata 'onnxzero': version, domain, every rewritten
site's technique and setting; a model rewritten again keeps the earlier sites) and, when its
settings are frozen, holds them as constants the kernels prepare once at session creation instead
of graph inputs a deployment may feed (set_provenance, freeze_settings; passes/rewrite.py calls
both).

A file is written to a temporary sibling and renamed over the target, so a
crash, Ctrl-C or a full disk never leaves a half-written output, and an input
file is never opened for writing. Outputs are checked before any work
(load.check_output_path), so a long search never ends in an unwritable path. A model
is loaded once by onnxruntime before the rename: a file onnxzero writes always
loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from onnxzero.errors import UserError


METADATA_KEY = "onnxzero"


def provenance(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The model's onnxzero provenance (see set_provenance), None for a model onnxzero did not write."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return None


def set_provenance(model: onnx.ModelProto, sites: dict[str, dict[str, Any]]) -> None:
    """Record this onnxzero's version and domain and `sites` ({site: {"technique", "setting"}}, JSON-able)
    in the model's metadata, on top of the sites an earlier rewrite recorded."""
    from onnxzero import DOMAIN, __version__

    earlier = (provenance(model) or {}).get("sites", {})
    prov = {"version": __version__, "domain": DOMAIN, "sites": {**earlier, **sites}}
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(prov, sort_keys=True))


def freeze_settings(model: onnx.ModelProto, names: list[str] | set[str]) -> None:
    """Freeze run-time settings: the graph inputs `names`, each defaulted by an initializer of its
    name, stop being inputs, so their defaults become constants (a deployment can no longer feed
    them; the kernels may prepare them once). In place."""
    names = set(names)
    defaults = {t.name for t in model.graph.initializer}
    missing = sorted(names - defaults)
    if missing:
        raise ValueError(f"freeze_settings: '{missing[0]}' has no default value (no initializer of that name)")
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def _umask() -> int:
    # os.umask only reads by setting; set it back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, protect: tuple[Path, ...] = (),
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write `path` through write(file) into a temporary sibling, verify(tmp) it, rename it over the target.

    The file gets the mode a plain open() would give (0666 less the umask), not mkstemp's 0600.
    An OSError (read-only, full disk, no such folder) is a one-line UserError; no partial file remains.
    """
    from onnxzero.load import check_output_path

    path = check_output_path(path, protect)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}; nothing written") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, protect: tuple[Path, ...] = ()) -> Path:
    return atomic_write(path, lambda f: f.write(data), protect=protect)


def atomic_write_json(path: str | Path, obj, *, protect: tuple[Path, ...] = ()) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), protect=protect)


def write_model(path: str | Path, model: onnx.ModelProto, *, protect: tuple[Path, ...] = ()) -> Path:
    """Write an ONNX model that onnxruntime (with onnxzero's ops) has loaded once from the written bytes."""
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data), protect=protect, verify=_loads_in_onnxruntime)


def _loads_in_onnxruntime(tmp: Path) -> None:
    from onnxzero.ops.session import make_session

    try:
        make_session(onnx.load(str(tmp)), threads=1)
    except UserError:
        raise
    except Exception as e:
        first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"the model to write does not load in onnxruntime ({first}); nothing written") from None


def jsonable(v: Any) -> Any:
    """Plain JSON values for reports, caches and provenance: arrays to lists, numpy scalars to Python
    ones, and a non-finite float to null (strict JSON has no inf or NaN)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
