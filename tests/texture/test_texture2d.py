"""The 2-D analytic texture model: exact against dense Gaussian algebra computed separately, its
pipeline as one view of the sampler, its canvases and tori distributed as the model says."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safa import JointDiffusion
from safa.testing import tiny_texture2d_pipeline
from safa.texture.model import temporal_kernel
from safa.texture.model2d import TextureModel2D
from safa_kernels import GridLayout, ViewLayout, gather


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_model():
    # 2 channels, 5 x 5 tiles, two classes: dense covariances of 50 x 50.
    return TextureModel2D(channels=2, window=5, class_names=["gravel", "clouds"])


def _dense_posterior(model, x, alpha_bar, class_weights, output):
    """Brute force: per component the dense covariance, its Gaussian posterior mean by a solve,
    the responsibilities by MultivariateNormal's log-density; nothing of the model's rotations."""
    rows = []
    for i in range(x.shape[0]):
        a, b = math.sqrt(alpha_bar[i]), math.sqrt(1 - alpha_bar[i])
        xi = x[i].reshape(-1)
        logp, means = [], []
        for k in range(model.num_components):
            c = int(model.component_class[k])
            # The dense covariance written from the kernels directly: A (x) K_rows (x) K_cols.
            lags = np.arange(model.window)[:, None] - np.arange(model.window)[None, :]
            kr = temporal_kernel(model.classes[c].rows, lags) + 1e-4 * np.eye(model.window)
            kc = temporal_kernel(model.classes[c].cols, lags) + 1e-4 * np.eye(model.window)
            sigma = torch.tensor(np.kron(model.channel_cov[k].numpy(), np.kron(kr, kc)))
            cov = a * a * sigma + b * b * torch.eye(sigma.shape[0], dtype=torch.float64)
            prior = float(class_weights[i, c]) / len(model.substyles)
            mvn = torch.distributions.MultivariateNormal(torch.zeros_like(xi), covariance_matrix=cov)
            logp.append(mvn.log_prob(xi) + (math.log(prior) if prior > 0 else -math.inf))
            x0 = a * sigma @ torch.linalg.solve(cov, xi)
            eps = (xi - a * x0) / b
            means.append({"sample": x0, "epsilon": eps, "v_prediction": a * eps - b * x0}[output])
        resp = torch.softmax(torch.stack(logp), 0)
        rows.append(sum(r * m for r, m in zip(resp, means)).reshape(x.shape[1:]))
    return torch.stack(rows)


@pytest.mark.parametrize("output", ["epsilon", "sample", "v_prediction"])
def test_the_denoiser_is_the_exact_gaussian_posterior(tiny_model, output):
    x = torch.randn(4, 2, 5, 5, generator=_gen(1), dtype=torch.float64) * 1.3
    cw = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]], dtype=torch.float64)
    alpha_bar = torch.tensor([0.05, 0.4, 0.4, 0.97], dtype=torch.float64)
    ours = tiny_model.denoise(x, alpha_bar, cw, output)
    torch.testing.assert_close(ours, _dense_posterior(tiny_model, x, alpha_bar, cw, output), rtol=1e-9, atol=1e-9)


def test_the_likelihoods_are_the_dense_gaussians(tiny_model):
    x = torch.randn(3, 2, 5, 5, generator=_gen(2), dtype=torch.float64)
    ours = tiny_model.log_likelihoods(x, 0.6)
    for k in range(tiny_model.num_components):
        cov = 0.6 * tiny_model.component_cov(k) + 0.4 * torch.eye(50, dtype=torch.float64)
        dense = torch.distributions.MultivariateNormal(torch.zeros(50, dtype=torch.float64), cov).log_prob(x.reshape(3, -1))
        torch.testing.assert_close(ours[:, k], dense, rtol=1e-10, atol=1e-9)


def test_the_model_refuses_other_tile_shapes(tiny_model):
    with pytest.raises(ValueError, match=r"tiles of shape \(B, 2, 5, 5\)"):
        tiny_model.denoise(torch.zeros(1, 2, 5, 6), torch.tensor([0.5]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"window must be an int of latent cells in \[2, 256\]"):
        TextureModel2D(window=1)
    with pytest.raises(ValueError, match="unknown texture prompt 'brick'"):
        tiny_model.encode_prompt("brick")


def _empirical_cov(samples: torch.Tensor) -> torch.Tensor:
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    return flat.T @ flat / flat.shape[0]


@pytest.mark.parametrize("periodic", [False, True], ids=["canvas", "torus"])
def test_canvas_and_torus_samples_have_the_exact_covariance(tiny_model, periodic):
    """20 000 draws of a 6 x 7 canvas of one component: the empirical covariance is the Kronecker
    product of the kernels over the canvas (wrapped on a torus), within sampling error, and is
    told apart from the other one (so the check has power)."""
    from safa.texture.model import wrapped_kernel
    k, h, w = 4, 6, 7  # component 4: clouds (smooth, so wrapping changes the covariance a lot)
    c = int(tiny_model.component_class[k])
    draws = tiny_model.sample(torch.full((20000,), k), h, w, generator=_gen(3), dtype=torch.float64,
                              periodic=periodic)
    emp = _empirical_cov(draws)

    def kron(rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.kron(tiny_model.channel_cov[k].numpy(), np.kron(rows, cols)))

    def circulant(first: np.ndarray) -> np.ndarray:
        n = len(first)
        return np.array([[first[(j - i) % n] for j in range(n)] for i in range(n)])

    line = kron(tiny_model.axis_cov(c, "rows", h).numpy(), tiny_model.axis_cov(c, "cols", w).numpy())
    torus = kron(circulant(wrapped_kernel(tiny_model.classes[c].rows, h)),
                 circulant(wrapped_kernel(tiny_model.classes[c].cols, w)))
    truth, other = (torus, line) if periodic else (line, torus)
    scale = float(truth.diagonal().max())
    assert float((emp - truth).abs().max()) < 0.06 * scale
    assert float((emp - other).abs().max()) > 0.2 * scale


def test_a_large_torus_is_the_model_within_a_window():
    model = TextureModel2D(window=16)
    assert model.periodic_error(16, 16) > 0.1          # a torus of one window: far from the model
    assert model.periodic_error(160, 160) < 1e-3       # ten windows: the wrapped terms have decayed


# -- the pipeline and its adapter -----------------------------------------------------------------
@pytest.fixture(scope="module", params=["DDIM", "DPMSolverMultistep"])
def jd(request):
    return JointDiffusion(tiny_texture2d_pipeline(seed=0, window=16, scheduler=request.param))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_one_view_is_the_pipelines_own_output_bitwise(jd, guidance_scale):
    latents = torch.randn(2, 4, 16, 16, generator=_gen(7))
    call = dict(num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    ours = jd(["gravel", "waves"], width=16, height=16, latents=latents, generator=_gen(), **call)
    theirs = jd.pipe(["gravel", "waves"], latents=latents.clone(), generator=_gen(), **call).images
    assert ours.layout.num_views == 1
    assert np.array_equal(ours.images, theirs)
    lat_ours = jd("weave", width=16, height=16, latents=latents[:1], output_type="latent", num_inference_steps=3).latent
    lat_theirs = jd.pipe("weave", latents=latents[:1].clone(), output_type="latent", num_inference_steps=3).images
    assert torch.equal(lat_ours, lat_theirs)


def test_the_pipeline_samples_its_tile_only(jd):
    with pytest.raises(ValueError, match="height must be the model's window, 16 px"):
        jd.pipe("gravel", height=32, num_inference_steps=1)


@pytest.mark.parametrize("method", ["safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular",
                                    "multidiffusion_gaussian"])
def test_strips_and_grids_run_and_merge(jd, method):
    strip = jd("grass", width=40, method=method, overlap=0.25, num_inference_steps=2, output_type="np",
               generator=_gen())
    assert isinstance(strip.layout, ViewLayout) and strip.layout.num_views == 3
    assert strip.images.shape == (1, 16, 40, 3) and np.isfinite(strip.images).all()
    grid = jd("grass", width=40, height=28, method=method, overlap=0.25, num_inference_steps=2,
              output_type="latent", generator=_gen())
    layout = grid.layout
    assert isinstance(layout, GridLayout) and (layout.rows.num_views, layout.cols.num_views) == (2, 3)
    assert grid.latent.shape == (1, 4, layout.rows.length, layout.cols.length)
    tiles = gather(grid.latent, layout, (-2, -1))
    assert tiles.shape == (6, 1, 4, 16, 16) and torch.isfinite(tiles).all()


def test_a_tiled_decode_is_the_whole_decode(jd):
    """The decoder maps each cell alone, so tiles decoded without context are exact."""
    call = dict(width=80, overlap=0.25, num_inference_steps=2, output_type="np")
    whole = jd("marble", decode="full", generator=_gen(), **call).images
    tiled = jd("marble", decode="tiled", decode_tile=7, generator=_gen(), **call).images
    assert np.array_equal(whole, tiled)


def test_a_torus_of_textures(jd):
    r = jd("waves", width=48, height=48, loop="both", method="safa", overlap=0.25, num_inference_steps=2,
           output_type="np", generator=_gen())
    assert r.layout.rows.loop and r.layout.cols.loop and r.images.shape == (1, 48, 48, 3)


def test_heights_below_the_tile_and_other_windows_are_refused(jd):
    with pytest.raises(ValueError, match="height must be at least the texture model's window, 16 px, got 8"):
        jd("gravel", width=40, height=8, num_inference_steps=1)
    with pytest.raises(ValueError, match="defined on tiles of exactly 16 latent cells, got window 24"):
        jd("gravel", width=40, window=24, num_inference_steps=1)


# -- the 2-D seam metrics ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model32():
    return TextureModel2D(window=32)


def _true_canvases(model, layout, prompts, seed, loop=False):
    cw = model.encode_prompt(prompts)
    comps = model.sample_components(cw, generator=_gen(seed))
    return model.sample(comps, layout.rows.length, layout.cols.length, generator=_gen(seed + 1), periodic=loop), cw


def test_grid_regions_are_the_products_of_the_axes_regions():
    from safa import metrics as M
    pick = lambda axis: {"overlap": M.overlap_columns(axis), "middle": M.interior_columns(axis, 8)}  # noqa: E731
    open_grid = GridLayout.covering(80, 80, 32, 8)
    counts = {k: len(v) for k, v in M.grid_regions(open_grid, pick, pick).items()}
    assert counts == {"vertical": 6, "horizontal": 6, "corner": 4, "interior": 9}
    torus = GridLayout.spaced(72, 72, 32, 3, loop=True)
    regions = M.grid_regions(torus, pick, pick)
    assert {k: len(v) for k, v in regions.items()} == {"vertical": 9, "horizontal": 9, "corner": 9, "interior": 9}
    # The wrap seam of the columns: cells 0..7, where the last tile (48..79 mod 72) overlaps the first.
    wraps = [(r, c) for w, r, c in regions["vertical"] if w]
    assert len(wraps) == 3 and all(c == list(range(8)) for _, c in wraps)


def test_true_canvases_have_no_seams_and_averaged_overlaps_do(model32):
    """On exact canvases the seam cells are like the interior; replacing the vertical seams' cells by
    the mean of two independent exact canvases (MultiDiffusion's merge of two independent views)
    halves their variance, which the HF ratio and the seam KL both show, on that seam kind only."""
    from safa import metrics as M
    layout = GridLayout.covering(80, 80, 32, 8)
    prompts = ["gravel", "marble", "weave", "clouds"] * 2
    x, cw = _true_canvases(model32, layout, prompts, 0)
    truth = M.grid_seam_statistics(model32, x, layout, cw)
    for kind in ("vertical", "horizontal", "corner"):
        _, lo, hi = M.log_ratio_ci(*truth.hf[kind])
        assert lo < 1 < hi, kind
    assert truth.consistent.all()
    y, _ = _true_canvases(model32, layout, prompts, 0)
    z, _ = _true_canvases(model32, layout, prompts, 5)  # same components (same seed for them), other noise
    blended = x.clone()
    for (_, cols) in M.overlap_columns(layout.cols):
        blended[..., cols] = (y[..., cols] + z[..., cols]) / 2
    smoothed = M.grid_seam_statistics(model32, blended, layout, cw)
    m, lo, hi = M.log_ratio_ci(*smoothed.hf["vertical"])
    assert hi < 0.7                                    # half the variance, HF included
    _, lo, hi = M.log_ratio_ci(*smoothed.hf["horizontal"])
    assert lo < 1 < hi                                 # the horizontal seams' cells were not touched
    excess = smoothed.kl["vertical"] - smoothed.kl["interior"]
    assert (excess > 0).all() and excess.mean() > 5e-3
    assert abs((truth.kl["vertical"] - truth.kl["interior"]).mean()) < excess.mean() / 2


def test_the_torus_wrap_seam_of_a_true_torus_is_a_seam_like_the_others(model32):
    from safa import metrics as M
    layout = GridLayout.spaced(72, 72, 32, 3, loop=True)
    x, cw = _true_canvases(model32, layout, ["marble", "clouds", "waves", "grass"] * 2, 3, loop=True)
    st = M.grid_seam_statistics(model32, x, layout, cw)
    _, lo, hi = M.log_ratio_ci(*st.hf["wrap"])
    assert lo < 1 < hi
    d, h = M.mean_ci(st.wrap_excess)
    assert abs(d) < h + 2e-3
    # A canvas cut open (an open sample used as a torus) has a hard wrap seam: the excess is large.
    open_x, _ = _true_canvases(model32, layout, ["marble", "clouds", "waves", "grass"] * 2, 3, loop=False)
    cut = M.grid_seam_statistics(model32, open_x, layout, cw)
    assert cut.wrap_excess.mean() > 10 * max(abs(d), 1e-3)
