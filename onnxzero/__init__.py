"""onnxzero: skip the work that ReLU throws away in CNN inference."""

from __future__ import annotations

import os
from pathlib import Path

from onnxzero._domain import DOMAIN, OP_VERSION
from onnxzero.errors import UserError

__version__ = "0.1.0"
__all__ = ["DOMAIN", "OP_VERSION", "UserError", "__version__", "get_library_path"]

_LIB_NAME = "libonnxzero_ops.so"


def get_library_path() -> str:
    """Path of the custom-op library, for SessionOptions.register_custom_ops_library.

    ONNXZERO_LIBRARY overrides it (used by the AddressSanitizer test target,
    which builds its own copy of the library).
    """
    override = os.environ.get("ONNXZERO_LIBRARY")
    if override:
        candidates = [Path(override)]
    else:
        # __path__ rather than __file__: an editable install keeps the built
        # library in site-packages while the Python sources stay in the checkout.
        candidates = [Path(p) / _LIB_NAME for p in __path__]
    for path in candidates:
        if path.is_file():
            return str(path)
    raise UserError(
        f"custom-op library not found at {candidates[0]}: expected it built by 'pip install .'"
    )
