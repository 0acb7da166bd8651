"""A function named by import path: "package.module:function" or "path/to/file.py:function".

Reward functions are given this way on the command line, and worker processes (`workers`) are told
this way what to run, so this module imports nothing of nanoseek.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.errors import InputError

__all__ = ["RewardLoadError", "absolute_spec", "load_callable"]


class RewardLoadError(InputError):
    """A function spec could not be resolved; the message says which part failed and why."""


def _is_file_module(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or os.sep in module_name


def _import_file(path: Path) -> Any:
    name = "nanoseek_user_reward_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def absolute_spec(spec: str) -> str:
    """The same spec with a file path made absolute ("rewards.py:fn" -> "/abs/rewards.py:fn")."""
    module_name, sep, attr = spec.strip().rpartition(":")
    if sep and module_name and _is_file_module(module_name):
        return f"{Path(module_name).resolve()}:{attr}"
    return spec.strip()


def load_callable(spec: str, what: str = "function") -> Callable[..., Any]:
    """Resolve "pkg.module:function" or "path/to/file.py:function" (dotted attributes allowed) to a callable.

    Errors are RewardLoadError naming `what`, the spec and the reason: malformed spec, module not found,
    module failed to import, attribute missing, or attribute not callable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLoadError(f"{what} spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        raise RewardLoadError(f"{what} {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        if _is_file_module(module_name):
            path = Path(module_name)
            if not path.is_file():
                raise RewardLoadError(f"{what} {spec!r}: file {module_name!r} not found")
            module = _import_file(path)
        else:
            module = importlib.import_module(module_name)
    except RewardLoadError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise RewardLoadError(
                f"{what} {spec!r}: module {module_name!r} not found (is it installed or on "
                f"PYTHONPATH? a file works too: 'path/to/file.py:{attr_path}')"
            ) from e
        raise RewardLoadError(f"{what} {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise RewardLoadError(f"{what} {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardLoadError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardLoadError(f"{what} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj
