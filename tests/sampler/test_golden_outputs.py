"""Regression guard: the final latents of a fixed set of calls, recorded once, checked bitwise.

Refactors of the sampler, the methods, the adapters or the op layer must not change a single
bit of what a call returns. Every method, open and loop layouts, audio and image families,
two schedulers each: the final long latent ``J`` (``output_type="latent"``) of each call in
:data:`CASES` is compared with the one recorded in ``tests/sampler/data/golden_latents.pt``.

Bitwise where the recording machine's floating-point setup is this one (same torch version and
CPU instruction set: the tiny models' convolutions pick kernels by ISA); elsewhere to float32
rounding, since another ISA rounds differently without anything being wrong.

An intended change of behaviour re-records the cases it touches, in the same commit, with:

    python tests/sampler/test_golden_outputs.py --record [case-name ...]
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, NamedTuple

import pytest
import torch

from safa import JointDiffusion
from safa.methods import parse_method_spec

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_latents.pt")


class Case(NamedTuple):
    pipeline: str        # a key of PIPELINES
    method: str          # a method spec, as the CLI takes it
    loop: bool
    scheduler: str       # "default" (the pipeline's own) or a diffusers scheduler name
    length: float        # seconds (audio) or width in pixels (images)


def _texture():
    from safa.texture import make_texture_pipeline
    return make_texture_pipeline(window_frames=64)


def _tiny(name: str) -> Callable[[], object]:
    def build():
        from safa import testing
        return getattr(testing, name)()
    return build


PIPELINES: Dict[str, Callable[[], object]] = {
    "texture": _texture,
    "audioldm": _tiny("tiny_audioldm_pipeline"),
    "stable_audio": _tiny("tiny_stable_audio_pipeline"),
    "sd": _tiny("tiny_sd_pipeline"),
    "sd3": _tiny("tiny_sd3_pipeline"),
}
PROMPTS = {"texture": "rain", "audioldm": "rain", "stable_audio": "rain", "sd": "a valley", "sd3": "a valley"}

_TEXTURE_METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "safa_stats",
                    "syncdiffusion:steps=0.5")
CASES: Dict[str, Case] = {}
for _method in _TEXTURE_METHODS:
    for _loop in (False, True):
        for _sched in ("default", "DDIM"):
            CASES[f"texture-{_method.split(':')[0]}-{'loop' if _loop else 'open'}-{_sched}"] = \
                Case("texture", _method, _loop, _sched, 6.48 if _loop else 6.5)
for _method, _loop, _sched in (("safa", False, "default"), ("safa", True, "EulerAncestralDiscrete"),
                               ("multidiffusion", True, "default"), ("multidiffusion_triangular", False, "DDPM")):
    CASES[f"audioldm-{_method}-{'loop' if _loop else 'open'}-{_sched}"] = \
        Case("audioldm", _method, _loop, _sched, 3.84 if _loop else 2.9)
# MAD as its authors run it (cross-attention merged at every step) and with per-view cross-attention.
for _method, _loop, _sched in (("safa", False, "default"), ("safa", True, "default"),
                               ("multidiffusion", False, "default"), ("mad", False, "default"),
                               ("mad", True, "DDIM"), ("mad:cross_attention=views", False, "default"),
                               ("mad:cross_attention=views", True, "DDIM"), ("safa_selfloop", True, "EulerDiscrete")):
    CASES[f"sd-{_method}-{'loop' if _loop else 'open'}-{_sched}"] = \
        Case("sd", _method, _loop, _sched, 832 if _loop else 1001)
CASES["sd3-safa-open-default"] = Case("sd3", "safa", False, "default", 601)
CASES["sd3-multidiffusion-loop-default"] = Case("sd3", "multidiffusion", True, "default", 416)
# Window 64 frames of 2048 samples at 44.1 kHz: 126 frames open.
CASES["stable_audio-safa-open-default"] = Case("stable_audio", "safa", False, "default", 5.85)


def run_case(case: Case, pipes: Dict[str, object]) -> torch.Tensor:
    """The final long latent of ``case`` (3 steps, seed 0, one thread)."""
    from safa.schedulers import set_scheduler
    pipe = pipes.get(case.pipeline)
    if pipe is None:
        pipe = pipes[case.pipeline] = PIPELINES[case.pipeline]()
    default_scheduler = getattr(pipe, "_golden_default_scheduler", None)
    if default_scheduler is None:
        default_scheduler = pipe._golden_default_scheduler = pipe.scheduler
    pipe.scheduler = default_scheduler
    if case.scheduler != "default":
        set_scheduler(pipe, case.scheduler)
    jd = JointDiffusion(pipe)
    kwargs = dict(method=parse_method_spec(case.method), loop=case.loop, num_inference_steps=3,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    if case.pipeline in ("texture", "audioldm", "stable_audio"):
        kwargs["seconds"] = case.length
        if case.pipeline == "audioldm":  # 32 latent frames at 25 frames/s
            kwargs.update(window=1.28, overlap=0.25)
    else:  # 16 latent rows instead of a square window: the long axis is what matters here
        kwargs.update(width=int(case.length), height=128)
    if case.pipeline in ("audioldm", "stable_audio", "sd", "sd3"):
        kwargs["guidance_scale"] = 3.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = jd(PROMPTS[case.pipeline], **kwargs)
    finally:
        torch.set_num_threads(threads)
    return out.latent.detach().clone()


def _fingerprint() -> str:
    return f"torch {torch.__version__.split('+')[0]} / {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="module")
def recorded():
    if not os.path.exists(DATA):
        pytest.fail(f"{DATA} is missing: record it with python tests/sampler/test_golden_outputs.py --record")
    return torch.load(DATA)


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_final_latents_are_the_recorded_ones(name, recorded, pipes):
    assert name in recorded["latents"], f"{name} not recorded: python tests/sampler/test_golden_outputs.py --record {name}"
    expected = recorded["latents"][name]
    got = run_case(CASES[name], pipes)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if recorded["fingerprint"] == _fingerprint():
        assert torch.equal(got, expected), \
            f"{name}: max abs difference {(got - expected).abs().max().item():.3g} from the recorded latent"
    else:  # another floating-point setup: float32 rounding only
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _record(names) -> None:
    torch.manual_seed(0)
    data = torch.load(DATA) if os.path.exists(DATA) else {"latents": {}}
    if not names:
        data["latents"] = {}
    pipes: Dict[str, object] = {}
    for name in names or sorted(CASES):
        data["latents"][name] = run_case(CASES[name], pipes)
        print(f"{name}: {tuple(data['latents'][name].shape)}")
    data["fingerprint"] = _fingerprint()
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    torch.save(data, DATA + ".tmp")
    os.replace(DATA + ".tmp", DATA)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--record":
        sys.exit("usage: python tests/sampler/test_golden_outputs.py --record [case-name ...]")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    unknown = [n for n in sys.argv[2:] if n not in CASES]
    if unknown:
        sys.exit(f"unknown cases: {', '.join(unknown)}")
    _record(sys.argv[2:])
