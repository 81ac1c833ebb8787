"""Pipeline-family adapters (see :mod:`safa.adapters.base` for the protocol).

Every module in this package registers its adapters on import; :func:`get_adapter`
imports them all on first use.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import (Adapter, AudioAdapter, Conditions, ImageAdapter, VideoAdapter, adapter_class_for,
                   register_adapter, registered_adapters)

__all__ = ["Adapter", "AudioAdapter", "ImageAdapter", "VideoAdapter", "Conditions", "register_adapter",
           "registered_adapters", "get_adapter", "load_all"]

_loaded = False


def load_all() -> None:
    """Import every adapter module once so that they register themselves."""
    global _loaded
    if _loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    _loaded = True


def get_adapter(pipe: Any) -> Adapter:
    """The adapter wrapping ``pipe``; ``ValueError`` listing the supported classes when none fits."""
    load_all()
    return adapter_class_for(pipe)(pipe)
