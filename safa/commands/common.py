"""What every ``safa`` subcommand shares: the same flags with the same meaning and defaults.

- ``--model`` (default the built-in texture model) and ``--window`` (seconds for audio, latent
  columns for images, in every subcommand; with the built-in model the model is built for that
  window);
- ``--guidance-scale``;
- ``--device`` (a clear one-line error when the device does not exist here);
- ``--quiet`` (library warnings and notices silenced; without it each is shown once);
- ``SAFA_BACKEND`` checked up front.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from typing import Any, Optional

from ..cli import CLIError

__all__ = ["BUILTIN_MODEL", "add_model_arguments", "add_guidance_argument", "resolve_device", "setup_logging",
           "check_backend_env", "load_pipeline", "set_scheduler"]

# The default --model: the built-in analytic texture model (no weights, no downloads).
BUILTIN_MODEL = "builtin:texture"
# Pipeline classes that are not in diffusers: module that exports them.
_CUSTOM_PIPELINE_MODULES = ("safa.texture",)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--window``, ``--device``, ``--quiet``."""
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help=f"local diffusers pipeline directory or cached hub id (default {BUILTIN_MODEL}: "
                        "the built-in analytic texture model)")
    p.add_argument("--window", type=float, default=None,
                   help="window: seconds for audio, latent columns for images (default: the model's native one; "
                        "the built-in model is built for the window asked)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, library warnings or notices (without it, each is shown once)")


def add_guidance_argument(p: argparse.ArgumentParser, default: Optional[float] = None, why: str = "") -> None:
    """``--guidance-scale``; default None: the pipeline's own (as the Python call)."""
    shown = ("the pipeline's own: 2.5 for AudioLDM, 7.5 for SD, 1.0 for the built-in model" if default is None
             else f"{default:g}")
    p.add_argument("--guidance-scale", type=float, default=default,
                   help=f"classifier-free guidance scale (default {shown}{': ' + why if why else ''})")


def resolve_device(name: Optional[str]) -> "Any":
    """``--device`` as a ``torch.device``; :class:`CLIError` for one that does not exist here."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); "
                           "use --device cpu")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {name}: this machine has {count} CUDA device(s) (0..{count - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise CLIError(f"--device {name}: safa runs on cpu, cuda or mps devices")
    return device


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once (deprecation notices repeat on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_logging(quiet: bool) -> None:
    """Library warnings and notices: silenced with ``--quiet``, else each shown once."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    if quiet:
        warnings.simplefilter("ignore")
        for log in (dlog, tlog):
            log.disable_progress_bar()
            log.set_verbosity_error()
        return
    warnings.simplefilter("once")
    once = _OncePerMessage()
    for log in (dlog, tlog):
        for handler in log.get_logger().handlers or [log.get_logger()]:
            handler.addFilter(once)


def check_backend_env(device: Any) -> None:
    """``SAFA_BACKEND``, when set, names a backend that exists and runs on ``device``."""
    value = os.environ.get("SAFA_BACKEND")
    if value is None or value == "auto":
        return
    from safa_kernels import BACKENDS, available_backends
    if value not in BACKENDS:
        raise CLIError(f"SAFA_BACKEND={value!r} is not a backend: choose one of auto, {', '.join(BACKENDS)} "
                       "(or unset it)")
    if value != "reference" and value not in available_backends(device):
        raise CLIError(f"SAFA_BACKEND={value!r} is not available for {device.type} tensors here; available: "
                       f"{', '.join(available_backends(device))} (or unset it)")


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not a directory is a path.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def load_pipeline(model: str, window: Optional[float] = None) -> Any:
    """Load ``model``: the built-in texture model, a local pipeline directory, or a cached hub id.

    The built-in model is defined on one window: with ``window`` (seconds) it is built for that
    window. Raises :class:`CLIError` for a missing directory, a directory that is not a
    pipeline, an unsupported pipeline class (checked before loading any weights) or an
    unknown id.
    """
    from ..adapters import load_all, registered_adapters
    load_all()
    supported = ", ".join(sorted(registered_adapters()))
    if model == BUILTIN_MODEL:
        from safa.texture import make_texture_pipeline, window_frames
        if window is None:
            return make_texture_pipeline()
        try:
            return make_texture_pipeline(window_frames=window_frames(window))
        except ValueError as exc:
            raise CLIError(f"--{exc}") from None
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise CLIError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
        with open(index_file) as f:
            class_name = json.load(f).get("_class_name")
        if class_name not in registered_adapters():
            raise CLIError(f"unsupported pipeline {class_name} in {model}; supported: {supported}")
        import importlib

        import diffusers
        cls = getattr(diffusers, class_name, None)
        for module_name in _CUSTOM_PIPELINE_MODULES:
            if cls is None:
                cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            raise CLIError(f"pipeline class {class_name} in {model} cannot be imported")
        return cls.from_pretrained(path)
    if os.path.exists(path):
        raise CLIError(f"model {model} is a file, not a pipeline directory")
    if _looks_like_path(model):
        raise CLIError(f"model directory {model} does not exist")
    from diffusers import DiffusionPipeline
    try:  # offline first: a cached hub id must work without a network
        return DiffusionPipeline.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (diffusers raises many types here)
        raise CLIError(f"model {model} is neither a local directory nor a cached hub id "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def set_scheduler(pipe: Any, name: str) -> None:
    """:func:`safa.schedulers.set_scheduler`, its error as a :class:`CLIError` (one line at the CLI)."""
    from ..schedulers import set_scheduler as _set
    try:
        _set(pipe, name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
