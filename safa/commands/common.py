"""What every ``safa`` subcommand shares: the same flags with the same meaning, checks and defaults.

- ``--model`` (default the built-in texture model; ``builtin:tiny-audioldm`` a tiny random
  AudioLDM, ``builtin:tiny-wan`` a tiny random Wan text-to-video) and ``--window`` (seconds for
  audio and video, latent columns for images, in every subcommand; with the built-in model the
  model is built for that window);
- ``--device`` (a clear one-line error when the device does not exist here), ``--backend``
  (the merge backend; checked with ``SAFA_BACKEND`` by the kernels' own resolver, before any
  work), ``--quiet`` (library warnings and notices silenced; without it each is shown once,
  and third-party notices that are not the user's business are never shown);
- ``--steps``, ``--guidance-scale``, ``--scheduler``, ``--seed``; ``--overlap``, ``--loop``,
  ``--view-batch-size``.

Flag values are checked by argparse types built on :mod:`safa._checks` (the checks the
Python arguments get), so a bad value is one line naming the flag. Nothing here imports
torch at module level: building the parser (``--help``) stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterator, Optional

from .._checks import check_int_range, check_positive_int, check_positive_number, check_range
from ..errors import CLIError

__all__ = ["BUILTIN_MODEL", "TINY_AUDIOLDM", "TINY_WAN", "SEED_MAX", "arg_type", "POSITIVE_INT",
           "POSITIVE_NUMBER",
           "NONNEGATIVE_INT", "NONNEGATIVE_NUMBER", "SEED", "add_model_arguments", "add_device_arguments",
           "add_sampling_arguments", "add_layout_arguments", "add_guidance_argument", "resolve_device",
           "check_backend", "use_backend", "setup_logging", "overlap_notice", "load_pipeline", "set_scheduler"]

# The default --model: the built-in analytic texture model (no weights, no downloads).
BUILTIN_MODEL = "builtin:texture"
# A tiny random-weight AudioLDM (safa.testing): a real UNet pipeline, offline.
TINY_AUDIOLDM = "builtin:tiny-audioldm"
# A tiny random-weight Wan text-to-video pipeline (safa.testing): long video, offline.
TINY_WAN = "builtin:tiny-wan"
# Pipeline classes that are not in diffusers: module that exports them.
_CUSTOM_PIPELINE_MODULES = ("safa.texture",)
# torch.Generator.manual_seed takes a 64-bit unsigned seed.
SEED_MAX = 2 ** 64 - 1
# Third-party notices about the libraries' own future, not about the user's run.
_NOT_THE_USERS_BUSINESS = re.compile(r"has been deprecated and will not receive bug fixes"
                                     r"|requires torchvision \(not installed\); falling back")


def arg_type(parse: Callable[[str], Any], check: Callable[[str, Any], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse`` the text, then ``check(name, value)`` (a :mod:`safa._checks`
    helper); its ``ValueError`` becomes argparse's one-line ``argument --flag: ...`` error."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        try:
            return check("value", value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None
    convert.__name__ = what
    return convert


POSITIVE_INT = arg_type(int, check_positive_int, "an int >= 1")
NONNEGATIVE_INT = arg_type(int, lambda n, v: check_int_range(n, v, 0), "an int >= 0")
POSITIVE_NUMBER = arg_type(float, check_positive_number, "a finite number > 0")
NONNEGATIVE_NUMBER = arg_type(float, lambda n, v: check_range(n, v, 0.0, math.inf, hi_open=True),
                              "a finite number >= 0")
SEED = arg_type(int, lambda n, v: check_int_range(n, v, 0, SEED_MAX), f"an int in [0, {SEED_MAX}]")
OVERLAP = arg_type(float, lambda n, v: check_range(n, v, 0.0, 1.0, hi_open=True), "a number in [0, 1)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--window``."""
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help=f"local diffusers pipeline directory or cached hub id (default {BUILTIN_MODEL}: "
                        f"the built-in analytic texture model; {TINY_AUDIOLDM}: a tiny random AudioLDM, offline; "
                        f"{TINY_WAN}: a tiny random Wan text-to-video pipeline, offline)")
    p.add_argument("--window", type=POSITIVE_NUMBER, default=None,
                   help="window: seconds for audio, latent columns for images (default: the model's native one; "
                        "the built-in model is built for the window asked)")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--backend``, ``--quiet``."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None,
                   help="merge backend: auto, cpp, cuda, triton or reference (default: SAFA_BACKEND if set, else auto)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, library warnings or notices (without it, each is shown once)")


def add_guidance_argument(p: argparse.ArgumentParser, default: Optional[float] = None, why: str = "") -> None:
    """``--guidance-scale``; default None: the pipeline's own (as the Python call)."""
    shown = ("the pipeline's own: 2.5 for AudioLDM, 7.5 for SD, 1.0 for the built-in model" if default is None
             else f"{default:g}")
    p.add_argument("--guidance-scale", type=NONNEGATIVE_NUMBER, default=default,
                   help=f"classifier-free guidance scale, >= 0 (default {shown}{': ' + why if why else ''})")


def add_sampling_arguments(p: argparse.ArgumentParser, steps: Optional[int] = None, steps_help: str = "") -> None:
    """``--steps``, ``--guidance-scale``, ``--scheduler``, ``--seed``; ``steps`` None: the pipeline's own."""
    p.add_argument("--steps", type=POSITIVE_INT, default=steps,
                   help=steps_help or ("denoising steps (default: the pipeline's own, as the Python call: 10 for "
                                       "AudioLDM, 50 for SD and the built-in model; the paper ran audio at 200)"))
    add_guidance_argument(p)
    p.add_argument("--scheduler", default=None,
                   help="diffusers scheduler class, e.g. DDIM, DPMSolverMultistep, EulerDiscrete (default: the model's)")
    p.add_argument("--seed", type=SEED, default=0, help=f"random seed, 0 to {SEED_MAX} (default 0)")


def _loop_value(text: str) -> str:
    if text != "both":
        raise argparse.ArgumentTypeError(f"takes no value, or 'both' (tile both ways), got {text!r}")
    return text


LOOP = _loop_value


def add_layout_arguments(p: argparse.ArgumentParser, view_batch_size: bool = True) -> None:
    """``--overlap``, ``--loop`` and (for a call that runs the model on views) ``--view-batch-size``."""
    p.add_argument("--overlap", type=OVERLAP, default=0.2,
                   help="overlap rate of neighbouring windows (default 0.2, the paper's; 0: no overlap, hard seams)")
    p.add_argument("--loop", nargs="?", const=True, default=False, type=LOOP, metavar="both",
                   help="seamless loop / 360-degree panorama; '--loop both': an image that tiles both ways "
                        "(a tileable texture, image pipelines)")
    if view_batch_size:
        p.add_argument("--view-batch-size", type=POSITIVE_INT, default=None,
                       help="windows per model call: bounds the model's memory (default: all, at most 16)")


def overlap_notice(overlap: float, quiet: bool) -> None:
    """A notice for ``--overlap 0``: allowed, but the windows only touch, so nothing smooths the seams."""
    if overlap == 0 and not quiet:
        print("notice: --overlap 0: the windows do not overlap, so nothing is merged and every seam is a hard cut",
              file=sys.stderr)


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


def check_backend(name: Optional[str], device: Any) -> str:
    """The merge backend ``--backend`` (or, when not given, ``SAFA_BACKEND``) names for ``device``.

    The check is the kernels' own (:func:`safa_kernels.resolve_backend`, the one a merge call
    makes), made before any work; its error names the flag or the variable that was given."""
    from safa_kernels import resolve_backend
    try:
        return resolve_backend(name, device)
    except (ValueError, RuntimeError) as exc:
        message = str(exc)  # names its source: "backend ..." for the argument, else SAFA_BACKEND
        if name is None:
            raise CLIError(f"{message} (or unset it)") from None
        raise CLIError(f"--{message}" if message.startswith("backend") else f"--backend: {message}") from None


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """``SAFA_BACKEND=name`` for the block (the sampler's merge has no backend argument); None: unchanged."""
    if name is None:
        yield
        return
    saved = os.environ.get("SAFA_BACKEND")
    os.environ["SAFA_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAFA_BACKEND", None)
        else:
            os.environ["SAFA_BACKEND"] = saved


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once (deprecation notices repeat on every call), and
    none of the third-party notices about the libraries' own future."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _NOT_THE_USERS_BUSINESS.search(message):
            return False
        key = (record.name, record.levelno, message)
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
    # Deprecations inside diffusers / transformers are for their developers, not for this run.
    for library in ("diffusers", "transformers", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=library)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=library)
    once = _OncePerMessage()
    for log in (dlog, tlog):
        for handler in log.get_logger().handlers or [log.get_logger()]:
            handler.addFilter(once)


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not a directory is a path.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def load_pipeline(model: str, window: Optional[float] = None) -> Any:
    """Load ``model``: the built-in texture model, :data:`TINY_AUDIOLDM`, :data:`TINY_WAN`, a local pipeline
    directory, or a cached hub id.

    The built-in model is defined on one window: with ``window`` (seconds) it is built for that
    window. Raises :class:`CLIError` for a missing directory, a directory that is not a
    pipeline, an unsupported pipeline class (checked before loading any weights) or an
    unknown id.
    """
    if model == TINY_AUDIOLDM:
        from ..testing import tiny_audioldm_pipeline
        return tiny_audioldm_pipeline()
    if model == TINY_WAN:
        from ..testing.pipelines import tiny_wan_pipeline
        return tiny_wan_pipeline()
    if model == BUILTIN_MODEL:
        from ..texture import make_texture_pipeline, window_frames
        if window is None:
            return make_texture_pipeline()
        try:
            return make_texture_pipeline(window_frames=window_frames(window))
        except ValueError as exc:
            raise CLIError(f"--{exc}") from None
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return _load_directory(model, path)
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


def _load_directory(model: str, path: str) -> Any:
    import importlib

    from ..adapters import load_all, registered_adapters
    load_all()
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise CLIError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
    with open(index_file) as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in registered_adapters():
        raise CLIError(f"unsupported pipeline {class_name} in {model}; supported: "
                       f"{', '.join(sorted(registered_adapters()))}")
    import diffusers
    cls = getattr(diffusers, class_name, None)
    for module_name in _CUSTOM_PIPELINE_MODULES:
        if cls is None:
            cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None:
        raise CLIError(f"pipeline class {class_name} in {model} cannot be imported")
    return cls.from_pretrained(path)


def set_scheduler(pipe: Any, name: str) -> None:
    """:func:`safa.schedulers.set_scheduler`, its error as a :class:`CLIError` (one line at the CLI)."""
    from ..schedulers import set_scheduler as _set
    try:
        _set(pipe, name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
