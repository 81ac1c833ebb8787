"""Pipeline-family adapters (see :mod:`safa.adapters.base` for the protocol).

Every module in this package registers its adapters on import; :func:`get_adapter`
imports them all on first use, plus the modules in ``_EXTRA_MODULES`` (adapters that live
elsewhere in safa), skipping those not present in this checkout.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import Adapter, Conditions, adapter_class_for, register_adapter, registered_adapters

__all__ = ["Adapter", "Conditions", "register_adapter", "registered_adapters", "get_adapter", "load_all"]

# Adapters outside this package (e.g. the built-in analytic texture model).
_EXTRA_MODULES = ("safa.texture",)
_loaded = False


def load_all() -> None:
    """Import every adapter module once so that they register themselves."""
    global _loaded
    if _loaded:
        return
    names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    for name in names + list(_EXTRA_MODULES):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only tolerate the module itself being absent, never a broken import inside it.
            if exc.name is None or not name.startswith(exc.name):
                raise
    _loaded = True


def get_adapter(pipe: Any) -> Adapter:
    """The adapter wrapping ``pipe``; ``ValueError`` listing the supported classes when none fits."""
    load_all()
    return adapter_class_for(pipe)(pipe)
