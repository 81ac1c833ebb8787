"""Performance tooling: the per-step profile, compile / CUDA-graph step functions, setup.py's build choice.

CPU tests use the tiny random AudioLDM with a 16-column window (0.64 s) so each call is a
few UNet passes on 16 x 16 latents. GPU tests (``-m gpu``) are skipped without CUDA.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import safa
from safa import accel, profiling
# The sampler needs diffusers, which a bare GPU machine may lack: reached through safa's lazy
# exports inside the tests (which skip there), not imported here.
from safa.methods import METHODS, get_method
from safa_kernels import ViewLayout
from safa_kernels.ops import available_backends

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """``-m gpu`` selects it; skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


# 0.64 s windows (16 latent columns) over 1.6 s: 3 views with 3 overlapping columns.
SMALL = dict(seconds=1.6, window=0.64, guidance_scale=1.0, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    pytest.importorskip("diffusers", reason="the tiny pipelines need diffusers")  # e.g. a bare GPU machine
    from safa.testing import tiny_audioldm_pipeline
    return tiny_audioldm_pipeline()


def run(jd: "safa.JointDiffusion", steps: int = 2, seed: int = 0, **kw) -> torch.Tensor:
    device = jd.adapter.device
    args = dict(SMALL, **kw)
    if args.get("method", "safa") == "safa":
        args.setdefault("guide", 1.0)  # the reference swap in every step
    return jd("rain", num_inference_steps=steps, generator=torch.Generator(device=device).manual_seed(seed),
              **args).latent


# -- the profile --------------------------------------------------------------------------------
# MAD also merges inside the model (stitch + gather per self-attention call while it is on):
# tests/methods/test_baselines.py counts those.
@pytest.mark.parametrize("method", [m for m in METHODS if m != "mad"])
def test_merge_is_one_op_per_step(pipe, method):
    """Every method's whole merge (SaFa: self-loop swap + reference swap) is ONE safa::merge_* op."""
    jd = safa.JointDiffusion(pipe)
    run(jd, steps=1, method=method)  # plans built outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(jd, steps=2, method=method)
    steps = profiling.analyse(prof.events())
    assert len(steps) == 2
    for s in steps:
        assert s.merge_ops == 1, (method, s)
        assert s.merge_compute_ops == 1, (method, s)  # everything else in the range is a view
        assert s.ops["model"] > 10 and s.ops["scheduler"] > 0
        assert s.total_ms >= s.ms["model"] > 0
    # the call: gather of the initial noise, one merge per step, the final stitch
    merges = [e for e in prof.events() if e.name.startswith("safa::merge_")]
    assert len(merges) == 2 + 2 and len({e.name for e in merges}) == 1


def test_analyse_attributes_ops_to_ranges():
    from torch.profiler import record_function
    x = torch.randn(64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function("safa.step"):
                with record_function("safa.model"):
                    (x * 2).sum()      # two top-level ops (their callees are not counted)
                with record_function("safa.scheduler"):
                    x.add(1)
                x.clone()              # other
    steps = profiling.analyse(prof.events())
    assert [s.ops for s in steps] == [{"model": 2, "scheduler": 1, "merge": 0, "other": 1}] * 2
    assert all(s.merge_ops == 0 and s.launches == dict.fromkeys(profiling.CATEGORIES, 0) for s in steps)


@pytest.mark.parametrize("mode,with_reference", [("swap", True), ("swap", False), ("mean", False)])
def test_naive_merge_step_equals_ours(mode, with_reference):
    layout = ViewLayout.covering(70, 16, 5)
    views, ref = torch.randn(layout.num_views, 2, 3, 16, 4), torch.randn(2, 3, 16, 4)
    ref = ref if with_reference else None
    expected = views.clone()
    accel.merge_step(expected, ref, layout, -2, mode, 2, -2)
    got = views.clone()
    profiling.naive_merge_step(got, ref, layout, -2, mode, 2, -2)
    if mode == "swap":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, views)  # the merge did something


def test_profile_cli_compare_writes_traces(tmp_path, capsys):
    from safa.cli import main
    trace = tmp_path / "trace.json"
    code = main(["profile", "--model", "builtin:tiny-audioldm", "--seconds", "1.6", "--window", "0.64",
                 "--guidance-scale", "1", "--steps", "2", "--warmup", "1", "--compare", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert code == 0
    assert "naive eager" in out and "merge ms" in out and "ratio" in out
    for path in (trace, tmp_path / "trace.naive.json"):
        names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
        assert {"safa.step", "safa.model", "safa.scheduler", "safa.merge"} <= names
    ours = json.loads(trace.read_text())["traceEvents"]
    # 2 steps, one op each, plus the call's initial gather and final stitch
    assert sum(str(e.get("name", "")).startswith("safa::merge_") for e in ours) == 2 + 2


def test_profile_cli_defaults_to_the_builtin_model_and_quiet_is_quiet(tmp_path, capfd):
    from safa.cli import main
    code = main(["profile", "--seconds", "24", "--window", "5.12", "--steps", "1", "--warmup", "0", "--quiet",
                 "--trace", str(tmp_path / "t.json")])
    out, err = capfd.readouterr()
    assert code == 0 and out.startswith("builtin:texture: ") and "of 5.12 s (128 latent frames)" in out
    assert err == ""  # no library notices, no profiler (kineto) lines
    # Why its guide differs from generate's, said on the first line.
    assert "safa (guide 1: the reference swap in every profiled step), backend cpp, seed 0" in out


def test_profile_cli_takes_generates_layout_and_sampling_flags(tmp_path, capfd):
    # --overlap, --loop, --scheduler, --seed, --view-batch-size mean what they mean in generate.
    from safa.cli import main
    code = main(["profile", "--seconds", "24", "--window", "5.12", "--steps", "1", "--warmup", "0", "--quiet",
                 "--overlap", "0.25", "--loop", "--scheduler", "DDIM", "--seed", "7", "--view-batch-size", "2",
                 "--backend", "reference", "--trace", ""])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "loop of 24 s" in out and "backend reference, seed 7" in out
    assert not (tmp_path / "t.json").exists()


def test_profile_cli_takes_method_specs(tmp_path, capfd):
    from safa.cli import main
    code = main(["profile", "--seconds", "24", "--window", "5.12", "--steps", "1", "--warmup", "0", "--quiet",
                 "--method", "safa_stats:snr=0.05:strength=0.5", "--trace", str(tmp_path / "t.json")])
    out, err = capfd.readouterr()
    assert code == 0 and "safa_stats:snr=0.05:strength=0.5, backend" in out, err
    assert main(["profile", "--method", "safa_stats:strength=2"]) == 2
    assert "strength must be in [0.0, 1.0]" in capfd.readouterr().err


def test_profile_cli_rejects_what_naive_cannot_do(capsys):
    from safa.cli import main
    assert main(["profile", "--method", "multidiffusion_triangular", "--compare"]) == 2
    assert "naive merge implements" in capsys.readouterr().err
    if not HAS_CUDA:
        assert main(["profile", "--cuda-graphs"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


# -- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_merge_step_compiles_without_graph_breaks(method):
    m = get_method(method)
    mode = m.merge_mode
    layout = accel.intern_layout(ViewLayout.covering(90, 16, 5 if mode == "swap" else 7))
    views = torch.randn(layout.num_views, 2, 3, 16, 4)
    # The merge gets a reference only from methods that swap it in (Eq. 10).
    for ref in {None, torch.randn(2, 3, 16, 4) if m.swaps_reference and m.reference_steps(1) else None}:
        args = (layout, -2, mode, 1, -2)
        explained = torch._dynamo.explain(accel.merge_step)(views.clone(), ref, *args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        targets = [str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
        assert sum("merge_" in t for t in targets) == 1, targets
        expected, got = views.clone(), views.clone()
        accel.merge_step(expected, ref, *args)
        accel.compiled_merge_step()(got, ref, *args)  # fullgraph=True: a graph break would raise
        assert torch.equal(got, expected)


def test_equal_layouts_share_one_compiled_graph():
    a, b = ViewLayout.covering(90, 16, 5), ViewLayout.covering(90, 16, 5)
    assert a is not b and accel.intern_layout(a) is accel.intern_layout(b)


def test_compile_true_matches_eager_without_recompiling(pipe, monkeypatch):
    # The plumbing with dynamo's "eager" backend (inductor codegen of the UNet takes minutes
    # on this CPU; its speed is measured by benchmarks/bench_steps.py instead).
    monkeypatch.setattr(accel, "COMPILE_BACKEND", "eager")
    expected = run(safa.JointDiffusion(pipe), method="safa")
    jd = safa.JointDiffusion(pipe, compile=True)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(run(jd, method="safa"), expected)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert torch.equal(run(jd, method="safa"), expected)  # a second call compiles nothing new
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert [s.merge_ops for s in profiling.analyse(prof.events())] == [1, 1]  # still one op per step


# -- the static-buffer step (what cuda_graphs=True captures) -------------------------------------------------
def test_static_model_step_is_shape_stable_and_equals_eager(pipe):
    jd = safa.JointDiffusion(pipe)
    adapter = jd.adapter
    cond = adapter.encode_prompts(["rain", "wind"], None, 2.5)
    rows = torch.tensor([0, 1, 1])
    chunks = [(0, 2, cond.take(rows[:2]), 2.5), (2, 3, cond.take(rows[2:]), 2.5)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 8, 16, 16, generator=g) for _ in range(3)]
    timesteps = torch.tensor([900, 500, 1])
    static = accel.StaticModelStep(adapter.predict, chunks, inputs[0], timesteps[0])
    pointers = (static.x.data_ptr(), static.t.data_ptr())
    outs = []
    for x, t in zip(inputs, timesteps):
        static.load(x, t)
        out = static.forward()
        eager = torch.cat([adapter.predict(x[a:b], t, c, scale) for a, b, c, scale in chunks])
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert (static.x.data_ptr(), static.t.data_ptr()) == pointers
        outs.append(out)
    assert len({(o.shape, o.stride(), o.dtype) for o in outs}) == 1
    with pytest.raises(ValueError, match="static step built for"):
        static.load(inputs[0][:2], timesteps[0])


def test_step_runner_scheduler_gets_host_timesteps():
    timesteps = torch.tensor([3, 2, 1])
    runner = accel.StepRunner.__new__(accel.StepRunner)
    runner.scheduler_timesteps = timesteps.cpu()
    assert runner.scheduler_timestep(1).device.type == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error")
def test_cuda_graphs_raises_clearly_without_cuda(pipe):
    with pytest.raises(RuntimeError, match="cuda_graphs=True needs CUDA"):
        safa.JointDiffusion(pipe, cuda_graphs=True)
    with pytest.raises(RuntimeError, match="CUDA graphs do not exist on CPU"):
        accel.check_cuda_graphs(torch.device("cpu"))
    with pytest.raises(ValueError, match="must be bools"):
        safa.JointDiffusion(pipe, compile="yes")


# -- the build choices of setup.py ----------------------------------------------------------------------
@pytest.mark.parametrize("force, cuda_sources", [(None, True), ("0", False), ("1", True)])
def test_setup_py_extension_choice(monkeypatch, force, cuda_sources):
    # The GPU kit's fallback after a failed CUDA build sets FORCE_CUDA=0: with a CUDA torch and
    # a CUDA_HOME the automatic choice would retry the CUDA build and fail again.
    import runpy
    import setuptools
    from torch.utils import cpp_extension
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/nonexistent-cuda")
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: (name, sources))
    monkeypatch.setattr(cpp_extension, "CppExtension", lambda name, sources, **kw: (name, sources))
    if force is None:
        monkeypatch.delenv("FORCE_CUDA", raising=False)
    else:
        monkeypatch.setenv("FORCE_CUDA", force)
    runpy.run_path(str(ROOT / "setup.py"))
    (name, sources), = captured["ext_modules"]
    assert name == "safa_kernels._C"
    assert any(src.endswith(".cu") for src in sources) is cuda_sources


# -- on a GPU ------------------------------------------------------------------------------------------------
def _sync_free_steps(jd: "safa.JointDiffusion", steps: int = 4, **kw) -> torch.Tensor:
    """Run with torch.cuda.set_sync_debug_mode('error') from the end of step 0 (which may sync
    legitimately: schedulers find their step index, a CUDA graph is captured) to the last step."""
    def callback(_jd, i, _t, _kw):
        torch.cuda.set_sync_debug_mode("error" if i < steps - 1 else 0)

    try:
        return run(jd, steps=steps, callback_on_step_end=callback, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda_graphs"])
@pytest.mark.parametrize("method", list(METHODS))
def test_no_host_sync_inside_the_step_loop(pipe, method, cuda_graphs):
    pipe.to("cuda")
    try:
        latent = _sync_free_steps(safa.JointDiffusion(pipe, cuda_graphs=cuda_graphs), method=method)
        expected = run(safa.JointDiffusion(pipe), steps=4, method=method)
        torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
    finally:
        pipe.to("cpu")



@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_merge_is_one_launch_per_step_on_cuda(pipe, backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"needs CUDA and the {backend} backend")
    pipe.to("cuda")
    try:
        jd = safa.JointDiffusion(pipe)
        os.environ["SAFA_BACKEND"] = backend
        run(jd, steps=1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(jd, steps=3)
    finally:
        os.environ.pop("SAFA_BACKEND", None)
        pipe.to("cpu")
    for s in profiling.analyse(prof.events()):
        assert s.merge_ops == 1 and s.launches["merge"] == 1, s
