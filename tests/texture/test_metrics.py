"""safa.metrics on synthetic inputs with known answers, and smoke tests of safa evaluate / the demo."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from safa import metrics as M
from safa.texture import TextureModel
from safa_kernels import ViewLayout


@pytest.fixture(scope="module")
def model() -> TextureModel:
    # Small but real: 2 channels x 4 bins, a 40-frame window.
    return TextureModel(channels=2, freq_bins=4, window=40, seed=3)


@pytest.fixture(scope="module")
def truth(model):
    """Exact long samples (one component each) over an open layout of 5 views, overlap 12."""
    layout = ViewLayout.covering(150, 40, 12)
    n = 60
    cw = model.encode_prompt(["rain", "fire", "crowd"] * (n // 3)).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    comps = model.sample_components(cw, generator=gen)
    return layout, cw, model.sample(comps, layout.length, generator=gen, dtype=torch.float64), comps


def _smooth_overlaps(x: torch.Tensor, layout: ViewLayout) -> torch.Tensor:
    """Average each overlap column with its neighbours along time (what averaging does to detail)."""
    y = x.clone()
    for _, cols in M.overlap_columns(layout):
        for c in cols:
            y[:, :, c] = (x[:, :, c - 1] + 2 * x[:, :, c] + x[:, :, (c + 1) % x.shape[2]]) / 4
    return y


def test_geometry(truth) -> None:
    layout = truth[0]
    ov = M.overlap_columns(layout)
    assert [p for p, _ in ov] == layout.neighbour_pairs()
    assert ov[0][1] == list(range(28, 40))
    loop = ViewLayout(90, 40, 10, loop=True)
    assert M.overlap_columns(loop)[-1] == ((2, 0), list(range(0, 10)))
    for v, cols in M.interior_columns(layout, 12):
        assert all(len(layout.coverage(c)) == 1 for c in cols)
    with pytest.raises(ValueError, match="middle region"):
        M.interior_columns(ViewLayout.covering(100, 40, 18), 12)


def test_hf_ratio_true_smoothed_and_noisy(truth) -> None:
    layout, _, x, _ = truth
    for ci in (M.ratio_ci, M.log_ratio_ci):
        m, lo, hi = ci(*M.hf_energies(M.region_spectra(x, layout)))
        assert lo < 1 < hi and hi - lo < 0.4                  # stationary: no overlap effect
        m, lo, hi = ci(*M.hf_energies(M.region_spectra(_smooth_overlaps(x, layout), layout)))
        assert hi < 0.7                                       # a high-frequency deficit
    noisy = x.clone()
    for _, cols in M.overlap_columns(layout):
        noisy[:, :, cols] += 0.7 * torch.randn_like(noisy[:, :, cols], generator=None)
    assert M.mean_ci(M.hf_energy_ratio(M.region_spectra(noisy, layout)))[0] > 1.2
    rel = M.region_spectra(_smooth_overlaps(x, layout), layout).relative_log_amplitude()
    assert rel["interior"][0] == 0 and rel["overlap"][-1] < rel["interior"][-1]


def test_probe_fidelity_true_vs_damaged_seams(model, truth) -> None:
    layout, cw, x, _ = truth
    fid = M.probe_fidelity(model, x, layout, cw, min_eigenvalue=0.1)
    assert fid.probe == 16 and fid.seam.shape == (60, 4)
    # True samples: whitened variances ~1 everywhere, tiny KL, seams like interiors.
    assert np.abs(fid.seam.mean(0) - 1).max() < 0.08 and np.abs(fid.interior.mean(0) - 1).max() < 0.08
    assert fid.kl("seam").mean() < 0.01
    smooth = M.probe_fidelity(model, _smooth_overlaps(x, layout), layout, cw, min_eigenvalue=0.1)
    assert smooth.seam[:, -1].mean() < 0.8                     # fastest band loses variance
    assert smooth.kl("seam").mean() > 5 * max(smooth.kl("interior").mean(), 1e-3)
    np.testing.assert_allclose(smooth.interior, fid.interior)  # interiors untouched


def test_whitening_is_exact_on_model_windows(model) -> None:
    cw = model.encode_prompt(["wind"] * 64).to(torch.float64)
    comps = model.sample_components(cw, generator=torch.Generator().manual_seed(1))
    x = model.sample(comps, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sq, got = M.whitened_band_variances(model, x, cw, bands=4, min_eigenvalue=0.0)
    assert (got == comps).float().mean() > 0.95                # the right sub-style is found
    assert np.abs(sq.mean(0).numpy() - 1).max() < 0.05
    # Halving the windows shows up as variance 1/4 in every band.
    sq2, _ = M.whitened_band_variances(model, 0.5 * x, cw, bands=4, min_eigenvalue=0.0)
    assert sq2.mean() < 0.6


def test_cross_view_consistency(model, truth) -> None:
    layout, cw, x, comps = truth
    same, frac = M.cross_view_consistency(model, x, layout, cw)
    assert same.all() and (frac == 1).all()
    # Replace the last view of every sample by a window of another sub-style of its class.
    other = comps + torch.where(comps % 3 == 2, -1, 1)
    y = x.clone()
    y[:, :, layout.length - 40:] = model.sample(other, generator=torch.Generator().manual_seed(7),
                                                dtype=torch.float64)
    same2, frac2 = M.cross_view_consistency(model, y, layout, cw)
    # View 4 changed; view 3 straddles both sub-styles and may go either way.
    assert not same2.any() and ((np.isclose(frac2, 0.8)) | (np.isclose(frac2, 0.6))).all()


def test_frechet_distance_known_values() -> None:
    assert M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(0, abs=1e-9)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2.
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4 + 1)
    # Diagonal: sum over dims.
    d = M.frechet_distance([0, 0], np.diag([1.0, 9.0]), [1, 0], np.diag([4.0, 1.0]))
    assert d == pytest.approx(1 + (1 - 2) ** 2 + (3 - 1) ** 2)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 2))
    b = rng.standard_normal((20000, 2)) * 2 + 1
    assert M.frechet_distance_from_embeddings(a, b) == pytest.approx(2 * 1 + 2 * 1, rel=0.05)


def test_class_kl_and_intra_similarity() -> None:
    assert M.class_kl([[1, 0]], [[0.5, 0.5]]) == pytest.approx(math.log(2))
    assert M.class_kl([[0.3, 0.7]], [[0.3, 0.7]]) == pytest.approx(0, abs=1e-12)
    # Paired vs unpaired: two swapped one-hots are far apart pairwise, equal on average.
    p, q = [[1, 0], [0, 1]], [[0.01, 0.99], [0.99, 0.01]]
    assert M.class_kl(p, q) > 4 and M.class_kl(p, q, paired=False) == pytest.approx(0, abs=1e-9)
    same = M.intra_similarity([[1, 1, 1]], lambda s: np.array([1.0, 2.0]))
    ortho = M.intra_similarity([[0, 1]], lambda s: np.eye(2)[s])
    assert same[0] == pytest.approx(1) and ortho[0] == pytest.approx(0)
    with pytest.raises(ValueError):
        M.intra_similarity([[0]], lambda s: np.ones(2))


def test_intervals() -> None:
    m, h = M.mean_ci([1.0, 2.0, 3.0])
    assert m == 2 and h == pytest.approx(1.96 * 1 / math.sqrt(3))
    p, lo, hi = M.proportion_ci(10, 10)
    assert p == 1 and hi == 1 and 0.65 < lo < 0.75


def test_middle_correlation_known_answers() -> None:
    layout = ViewLayout(160, 40, 8, loop=True)            # 5 views, middles at local [8, 32)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 3, 160, 4, generator=gen, dtype=torch.float64)
    assert np.abs(M.middle_correlation(noise, layout)).max() < 0.1  # independent: ~0 (D = 288 per view)
    copied, common = noise.clone(), torch.randn(6, 3, 24, 4, generator=gen, dtype=torch.float64)
    for rho in (1.0, 0.6):  # middles rho * common + own noise: two views correlate by rho^2
        for v in range(layout.num_views):
            cols = layout.columns(v)[8:32]
            copied[:, :, cols] = rho * common + math.sqrt(1 - rho * rho) * noise[:, :, cols]
        np.testing.assert_allclose(M.middle_correlation(copied, layout), rho ** 2, atol=0.1 if rho < 1 else 1e-12)
    # Open layouts: the end views' middles run to the edge; the common columns are the inner ones.
    open_ = ViewLayout(136, 40, 8)
    x = torch.randn(2, 3, 136, 4, generator=gen, dtype=torch.float64)
    for v in range(open_.num_views):
        x[:, :, open_.columns(v)[8:32]] = common[:2]
    np.testing.assert_allclose(M.middle_correlation(x, open_), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="middle columns in common"):
        M.middle_correlation(torch.zeros(1, 1, 60, 1), ViewLayout(60, 40, 30, loop=True))


def test_periodic_truth_wraps_and_a_line_does_not(model) -> None:
    # Drawn on a circle, the frame after the last is the first (lag covariance across the wrap = the
    # kernel's); drawn on a line, the two ends are independent. The model's kernels have decayed well
    # within 600 frames, so a window of the periodic texture is the model's to 1e-3.
    from safa.texture.model import temporal_kernel
    cw = model.encode_prompt(["wind"] * 2000).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    comps = model.sample_components(cw, generator=gen)
    kernel = temporal_kernel(model.classes[model.class_names.index("wind")].temporal, np.array([1, 3]))
    assert model.periodic_error(600) < 1e-3 < model.periodic_error(100)
    for periodic in (True, False):
        x = model.sample(comps, 600, generator=gen, dtype=torch.float64, periodic=periodic)
        x = x / x.pow(2).mean((0, 2), keepdim=True).sqrt()          # unit variance per (channel, bin)
        for lag, k in zip((1, 3), kernel):
            across = (x[:, :, 600 - lag:] * x[:, :, :lag]).mean().item()
            inside = (x[:, :, 100:100 + lag] * x[:, :, 100 - lag:100]).mean().item()
            assert abs(inside - k) < 0.04                            # 16000 products each: sd ~0.015
            assert abs(across - (k if periodic else 0.0)) < 0.04


def test_wrap_excess_compares_like_with_like(model) -> None:
    # One seam's KL is noisier than the pooled seam KL, so KL(wrap) - KL(seam) is biased upwards even
    # for exact loops; the wrap seam against single inner seams (the same estimator) is not.
    layout = ViewLayout(160, 40, 8, loop=True)
    cw = model.encode_prompt(["rain", "fire", "crowd"] * 40).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = model.sample(model.sample_components(cw, generator=gen), 160, generator=gen, dtype=torch.float64,
                     periodic=True)
    fid = M.probe_fidelity(model, x, layout, cw)
    naive, h = M.mean_ci(fid.kl("wrap") - fid.kl("seam"))
    assert naive - h > 0
    fair, h = M.mean_ci(fid.wrap_excess())
    assert abs(fair) < h
    assert fid.seam_each.shape == (layout.num_views, 120, 4)
    np.testing.assert_array_equal(fid.wrap, fid.seam_each[-1])


def test_method_specs() -> None:
    from safa import SaFa, SaFaStats
    from safa.evaluate import parse_method_spec
    assert parse_method_spec("safa") == SaFa()
    assert parse_method_spec("safa:guide=0.6:swap_interval=2") == SaFa(guide=0.6, swap_interval=2)
    assert parse_method_spec(" safa_stats:snr=0.05:strength=0.5") == SaFaStats(snr=0.05, strength=0.5)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method_spec("nope:guide=1")
    with pytest.raises(ValueError, match="is not name=value"):
        parse_method_spec("safa:guide")
    with pytest.raises(ValueError, match="gide does not apply to method 'safa'"):
        parse_method_spec("safa:gide=0.5")


def test_texture_pipeline_schedulers_do_not_clip() -> None:
    # The built-in latents are unbounded: DDIM made from its config (--scheduler DDIM) must not clip x0.
    from safa.commands.common import set_scheduler
    from safa.texture import make_texture_pipeline
    pipe = make_texture_pipeline(window_frames=32)
    set_scheduler(pipe, "DDIM")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False


def test_evaluate_smoke_cli(tmp_path, capsys) -> None:
    from safa.cli import main
    plot = tmp_path / "ev.png"
    rc = main(["evaluate", "--samples", "2", "--seconds", "2.4", "--window", "0.96", "--steps", "3",
               "--prompts", "rain", "--loop", "--min-eigenvalue", "0.1", "--plot", str(plot), "--out", str(tmp_path),
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("true", "one window", "safa", "safa_stats", "safa_selfloop", "multidiffusion",
                 "multidiffusion_triangular", "wrap HF", "wrap-seam", "sub-styles", "repeat", "note:"):
        assert name in out
    assert plot.stat().st_size > 1000
    assert "safa_selfloop" in (tmp_path / "evaluate.txt").read_text()
    assert sorted(os.listdir(tmp_path)) == ["ev.png", "evaluate.txt"]  # nothing else, no temporary files
    assert main(["evaluate", "--methods", "nope", "--samples", "2", "--out", str(tmp_path)]) == 2
    assert main(["evaluate", "--methods", "safa:gide=1", "--samples", "2", "--out", str(tmp_path)]) == 2
    assert main(["evaluate", "--scheduler", "nope", "--samples", "2", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    for bad, says in ((["--methods", ""], "--methods needs at least one method"),
                      (["--seconds", "-24"], "argument --seconds: must be a finite number > 0"),
                      (["--seconds", "5"], "needs at least two views"),
                      (["--seconds", "1e9"], "needs about"),
                      (["--out", "/proc/nope"], "cannot create --out /proc/nope")):
        assert main(["evaluate", "--samples", "2", *bad] + ([] if "--out" in bad else ["--out", str(tmp_path)])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (bad, err)
    rc = main(["evaluate", "--samples", "2", "--seconds", "2.4", "--window", "0.96", "--steps", "3", "--prompts",
               "rain", "--methods", "safa:guide=0.6,safa_stats:snr=0.05", "--scheduler", "DDIM", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "safa:guide=0.6" in out and "safa_stats:snr=0.05" in out and "DDIMScheduler" in out


def test_demo_smoke(tmp_path, capsys) -> None:
    from safa.demo import main
    assert main(["--out", str(tmp_path), "--seconds", "2.4", "--window", "0.96", "--steps", "2",
                 "--samples", "2", "--prompt", "surf"]) == 0
    for f in ("safa.wav", "multidiffusion.wav", "spectrograms.png", "evaluate.png"):
        assert (tmp_path / f).stat().st_size > 1000
    import soundfile as sf
    audio, sr = sf.read(str(tmp_path / "safa.wav"))
    assert sr == 16000 and audio.shape == (38400,)
    captured = capsys.readouterr()
    # The short table (readable in a terminal), the demo's own seed, the time labelled as generation time.
    assert "HF kept in overlaps" in captured.out and "seeds from 0" in captured.out
    assert max(map(len, captured.out.splitlines())) <= 100
    assert "safa.wav (2.4 s of audio, seed 0; generated in" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["evaluate.png", "multidiffusion.wav", "safa.wav", "spectrograms.png"]


def test_paired_statistics() -> None:
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    b = np.zeros(10, bool)
    assert M.mcnemar_p(a, b) == pytest.approx(2 * 1 / 2 ** 9)
    assert M.mcnemar_p(a, a) == 1.0
    rng = np.random.default_rng(0)
    den = rng.uniform(1, 2, 40)
    d, lo, hi = M.paired_ratio_difference_ci((0.8 * den, den), (den * rng.uniform(0.99, 1.01, 40), den))
    assert d == pytest.approx(-0.2, abs=0.01) and hi < 0 and lo > -0.25
    g, lo, hi = M.paired_log_ratio_ci((0.8 * den, den), (den * rng.uniform(0.99, 1.01, 40), den))
    assert g == pytest.approx(0.8, rel=0.01) and lo < 0.8 < hi < 0.82
    g, lo, hi = M.log_ratio_ci([2.0, 8.0], [1.0, 1.0])
    assert g == pytest.approx(4.0)


def test_notes_pair_each_guided_row_with_the_unguided_sampler():
    # The interior KL of a guided row minus safa_selfloop's on the same noise, sample by sample.
    from safa.evaluate import EvalResult, RowStats, _notes
    rng = np.random.default_rng(0)
    base = rng.uniform(1e-3, 2e-3, 16)
    ones = (np.ones(16), np.ones(16))
    rows = [RowStats("safa_selfloop", hf=ones, int_kl=base),
            RowStats("safa_stats", int_kl=base + 1e-3 + rng.normal(0, 1e-5, 16)),   # costs 1.0e-3
            RowStats("safa_stats:snr=0.05", int_kl=base + np.tile([1e-4, -1e-4], 8)),  # costs nothing
            RowStats("multidiffusion_triangular", hf=ones, int_kl=base - 1e-3)]     # not a guidance: no note
    notes = _notes(EvalResult(rows=rows, freqs=np.zeros(1), layout=None, settings={"min_eigenvalue": 1.0}))
    paired = [n for n in notes if n.startswith("interior KL")]
    assert len(paired) == 2
    assert paired[0].startswith("interior KL safa_stats - safa_selfloop = 1.00 ± 0.00") \
        and paired[0].endswith("the guidance costs interior fidelity.")
    assert paired[1].endswith("no significant interior cost.")
