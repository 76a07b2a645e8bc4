"""Emit: every file onnxzero writes goes through here, atomically.

A file is written to a temporary sibling and renamed over the target, so a
crash or Ctrl-C never leaves a half-written output, and an input file is
never opened for writing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from onnxzero.errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes, *, protect: tuple[Path, ...] = ()) -> Path:
    from onnxzero.load import check_output_path

    path = check_output_path(path, protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj, *, protect: tuple[Path, ...] = ()) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), protect=protect)
