"""The optional C twins of the receive path's hot spots (`media._fast`, built from _fast.c).

`fast` is the compiled module, or None when it is missing (built without a C compiler) or
turned off with the environment variable MEDIA_ACCEL=0 (read at import: tests and
benchmarks compare both paths). Everything it does has a pure-Python twin that gives the
same results; `name` says which one runs, for logs and benchmark output.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["fast", "name"]

fast: ModuleType | None
if os.environ.get("MEDIA_ACCEL", "1").strip().lower() in ("0", "false", "no", "off"):
    fast = None
else:
    try:
        fast = importlib.import_module("media._fast")
    except ImportError:  # no compiled twin here
        fast = None

name = "C (media._fast)" if fast is not None else "pure Python"
