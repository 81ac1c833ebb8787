"""safa.tiled_vae: the tiled decode / encode equal diffusers' whole decode / encode up to float rounding.

The oracle is diffusers' own ``vae.decode`` / ``vae.encode`` on the same weights. In float64
the tiled result equals it to 1e-10 (the tiling changes nothing but summation order); in
float32 it is no farther from the float64 result than diffusers' own float32 decode is.
"""
from __future__ import annotations

import pytest
import torch

from safa import tiled_vae
from safa.testing.pipelines import _tiny_image_vae


def _vae(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    vae = _tiny_image_vae(**kwargs).eval().to(dtype)
    return vae


@pytest.fixture(scope="module")
def vae64():
    return _vae()


def _latent(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# (latent shape, tile): several tiles with a remainder, odd tile counts, one tile, one row
SIZES = [((1, 4, 24, 40), 8), ((2, 4, 24, 40), 11), ((1, 4, 13, 29), 9), ((1, 4, 16, 16), 64),
         ((1, 4, 9, 50), 16)]


@pytest.mark.parametrize("shape,tile", SIZES)
def test_decode_equals_full_decode_in_float64(vae64, shape, tile):
    z = _latent(shape)
    with torch.no_grad():
        full = vae64.decode(z).sample
    out = tiled_vae.decode(vae64, z, tile=tile)
    assert out.shape == full.shape and out.dtype == full.dtype
    torch.testing.assert_close(out, full, rtol=0, atol=1e-10)


def test_decode_tiles_cover_the_image_once_in_row_major_order(vae64):
    z = _latent((1, 4, 24, 40))
    seen = torch.zeros(192, 320, dtype=torch.int64)
    starts = []
    for r, c, piece in tiled_vae.decode_tiles(vae64, z, tile=11):
        seen[r:r + piece.shape[-2], c:c + piece.shape[-1]] += 1
        starts.append((r, c))
    assert bool((seen == 1).all()) and starts == sorted(starts)


@pytest.mark.parametrize("kwargs", [dict(), dict(latent_channels=16, use_quant_conv=False,
                                                 use_post_quant_conv=False)])
def test_float32_decode_is_as_close_to_float64_as_the_full_decode(kwargs):
    # SD 1.x / 2.x / XL layout, and SD3 / Flux's (16 latent channels, no quant convs)
    vae64 = _vae(**kwargs)
    vae32 = _vae(torch.float32, **kwargs)
    z = _latent((1, vae64.config.latent_channels, 24, 40))
    with torch.no_grad():
        exact = vae64.decode(z).sample
        full = vae32.decode(z.float()).sample.double()
    tiled = tiled_vae.decode(vae32, z.float(), tile=11).double()
    full_err, tiled_err = (full - exact).abs().max().item(), (tiled - exact).abs().max().item()
    assert tiled_err <= 2 * full_err + 1e-6, (tiled_err, full_err)
    assert (tiled - full).abs().max().item() < 1e-4 * exact.abs().max().item()


def _wrapping(vae, loops):
    """The decoder with every convolution padding circularly on the looping axes: the whole-image
    oracle of a cylinder / torus decode (nearest upsampling commutes with the wrap)."""
    handles = []
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv2d) and module.padding[0] > 0:
            p = module.padding[0]
            module.padding = (0, 0)

            def pad(mod, args, p=p):
                x = args[0]
                x = torch.cat([x[..., -p:], x, x[..., :p]], -1) if loops[1] else torch.nn.functional.pad(x, (p, p))
                x = torch.cat([x[..., -p:, :], x, x[..., :p, :]], -2) if loops[0] else \
                    torch.nn.functional.pad(x, (0, 0, p, p))
                return (x,)
            handles.append((module, p, module.register_forward_pre_hook(pad)))
    return handles


@pytest.mark.parametrize("loops", [(False, True), (True, True), (True, False)])
def test_loops_decode_as_the_wrapped_image(loops):
    vae = _vae()
    z = _latent((1, 4, 16, 24))
    out = tiled_vae.decode(vae, z, tile=9, loops=loops)
    handles = _wrapping(vae, loops)
    try:
        with torch.no_grad():
            wrapped = vae.decode(z).sample
    finally:
        for module, p, handle in handles:
            handle.remove()
            module.padding = (p, p)
    torch.testing.assert_close(out, wrapped, rtol=0, atol=1e-10)
    # and the result really wraps: its left and right edges continue each other like its interior
    if loops[1]:
        seam = (out[..., 0] - out[..., -1]).abs().mean()
        interior = (out[..., 1:] - out[..., :-1]).abs().mean()
        assert seam < 3 * interior


def test_attention_in_query_chunks_is_the_same(vae64, monkeypatch):
    z = _latent((1, 4, 24, 40))
    whole = tiled_vae.decode(vae64, z, tile=11)
    monkeypatch.setattr(tiled_vae, "ATTENTION_SCORES", 960 * 7)  # 7 queries per chunk, 960 keys
    torch.testing.assert_close(tiled_vae.decode(vae64, z, tile=11), whole, rtol=0, atol=1e-12)


def test_offload_gives_the_same_tiles(vae64):
    z = _latent((1, 4, 16, 24))
    torch.testing.assert_close(tiled_vae.decode(vae64, z, tile=8, offload=True), tiled_vae.decode(vae64, z, tile=8),
                               rtol=0, atol=0)


# -- the disk store: every layer's tiles in memory-mapped unnamed files --------------------------
@pytest.mark.parametrize("shape,tile,key_chunk", [((1, 4, 24, 40), 11, 7), ((2, 4, 13, 29), 9, 4096),
                                                  ((1, 4, 16, 16), 64, 100)])
def test_disk_store_decode_equals_full_decode_in_float64(vae64, tmp_path, shape, tile, key_chunk):
    # key_chunk below the token count: the attention reads the keys in passes (online softmax)
    z = _latent(shape)
    with torch.no_grad():
        full = vae64.decode(z).sample
    store = tiled_vae.DiskStore(str(tmp_path))
    store.key_chunk = key_chunk
    out = tiled_vae.decode(vae64, z, tile=tile, offload=store)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-10)
    layer = vae64.config.block_out_channels[0] * shape[0] * shape[2] * shape[3] * 64 * 8
    assert store.peak_bytes >= layer  # at least one full-resolution layer was on disk
    assert store.live_bytes == 0 and list(tmp_path.iterdir()) == []  # files unnamed, and gone with their tiles


def test_disk_store_keeps_no_layer_in_memory(vae64):
    # the live tensors of the disk decode are one tile's work: far below one full-resolution layer
    from safa.profiling.memory import LiveTensorPeak
    vae = _vae(torch.float32)
    z = _latent((1, 4, 48, 48), torch.float32)
    with LiveTensorPeak() as in_memory:
        for _ in tiled_vae.decode_tiles(vae, z, tile=8):
            pass
    store = tiled_vae.DiskStore()
    with LiveTensorPeak() as on_disk:
        for _ in tiled_vae.decode_tiles(vae, z, tile=8, offload=store):
            pass
    assert on_disk.peak * 3 < in_memory.peak, (on_disk.peak, in_memory.peak)
    assert store.peak_bytes > in_memory.peak / 2


def test_disk_store_files_go_on_error(tmp_path, monkeypatch):
    vae = _vae(torch.float32)
    z = _latent((1, 4, 16, 16), torch.float32)
    store = tiled_vae.DiskStore(str(tmp_path))
    calls, norm_stats = [], tiled_vae._norm_stats

    def interrupted(*args):  # an interrupt half-way through the decoder, layers on disk
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return norm_stats(*args)
    monkeypatch.setattr(tiled_vae, "_norm_stats", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiled_vae.decode(vae, z, tile=8, offload=store)
    import gc
    gc.collect()
    assert store.peak_bytes > 0 and store.live_bytes == 0 and list(tmp_path.iterdir()) == []


def test_encode_with_disk_store_equals_full_encode(vae64):
    x = _latent((1, 3, 136, 200)).clamp(-1, 1)
    with torch.no_grad():
        full = vae64.encode(x).latent_dist
    torch.testing.assert_close(tiled_vae.encode(vae64, x, tile=72, offload="disk").mean, full.mean, rtol=0, atol=1e-10)


@pytest.mark.parametrize("offload,match", [("ram", "offload must be False, True / 'host', 'disk'"),
                                           (3, "offload must be False")])
def test_bad_offload_is_a_value_error(vae64, offload, match):
    with pytest.raises(ValueError, match=match):
        tiled_vae.decode(vae64, _latent((1, 4, 16, 16)), tile=8, offload=offload)


@pytest.mark.parametrize("size,tile", [((192, 256), 64), ((136, 200), 72), ((64, 64), 512), ((2, 120, 328), 96)])
def test_encode_equals_full_encode_in_float64(vae64, size, tile):
    batch = size[0] if len(size) == 3 else 1
    h, w = size[-2:]
    x = _latent((batch, 3, h, w)).clamp(-1, 1)
    with torch.no_grad():
        full = vae64.encode(x).latent_dist
    dist = tiled_vae.encode(vae64, x, tile=tile)
    torch.testing.assert_close(dist.mean, full.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(dist.logvar, full.logvar, rtol=0, atol=1e-10)


def test_encode_float32_close_to_full():
    vae = _vae(torch.float32)
    x = _latent((1, 3, 128, 192), torch.float32).clamp(-1, 1)
    with torch.no_grad():
        full = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(tiled_vae.encode(vae, x, tile=64).mean, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda v: tiled_vae.decode(v, _latent((1, 4, 16, 16)), tile=4), r"tile must be an int >= 8"),
    (lambda v: tiled_vae.decode(v, _latent((1, 4, 16, 16)), tile=8.0), r"tile must be an int >= 8"),
    (lambda v: tiled_vae.decode(v, _latent((1, 3, 16, 16))), r"z must be a \(B, 4, h, w\) latent"),
    (lambda v: tiled_vae.decode(v, _latent((4, 16, 16))), r"z must be a \(B, 4, h, w\) latent"),
    (lambda v: tiled_vae.encode(v, _latent((1, 1, 64, 64))), r"pixels must be a \(B, 3, H, W\) image"),
    (lambda v: tiled_vae.encode(v, _latent((1, 4, 64, 64))), r"pixels must be a \(B, 3, H, W\) image"),
    (lambda v: tiled_vae.encode(v, _latent((1, 3, 60, 64))), r"multiples of 8"),
    (lambda v: tiled_vae.encode(v, _latent((1, 3, 64, 64)), tile=60), r"tile must be an int multiple of 8 >= 64"),
    (lambda v: tiled_vae.encode(v, _latent((1, 3, 64, 64)), tile=32), r"tile must be an int multiple of 8 >= 64"),
    (lambda v: tiled_vae.decode(torch.nn.Linear(2, 2), _latent((1, 4, 16, 16))), r"AutoencoderKL-style VAE"),
])
def test_bad_input_is_a_value_error(vae64, call, match):
    with pytest.raises(ValueError, match=match):
        call(vae64)


def test_tile_bounds_are_near_equal_multiples():
    assert tiled_vae.tile_bounds(40, 11) == (0, 10, 20, 30, 40)
    assert tiled_vae.tile_bounds(16, 64) == (0, 16)
    b = tiled_vae.tile_bounds(328, 96, 8)
    assert b[0] == 0 and b[-1] == 328 and all(v % 8 == 0 for v in b) and max(map(lambda p: p[1] - p[0],
                                                                              zip(b, b[1:]))) <= 96


# -- the memory rule -------------------------------------------------------------------------
@pytest.mark.parametrize("shape,tile", [((1, 4, 32, 48), 16), ((2, 4, 24, 24), 8), ((1, 4, 64, 64), 64)])
def test_tiled_decode_bytes_bounds_the_measured_peak(shape, tile):
    from safa.memory import tiled_decode_bytes
    from safa.profiling.memory import LiveTensorPeak
    vae = _vae(torch.float32)
    z = _latent(shape, torch.float32)
    with LiveTensorPeak() as peak:
        tiled_vae.decode(vae, z, tile=tile)
    estimate = tiled_decode_bytes(vae.config, z.shape, 4, tile)
    assert peak.peak <= estimate <= 1.6 * peak.peak, (peak.peak, estimate)


@pytest.mark.parametrize("shape,tile", [((1, 4, 32, 48), 16), ((2, 4, 24, 24), 8), ((1, 4, 64, 64), 64),
                                        ((1, 4, 96, 96), 16)])
def test_tiled_disk_decode_bytes_bounds_the_measured_peak(shape, tile):
    # decode_tiles on disk, consumed one tile row at a time (as the streamed PNG is written)
    from safa.memory import tiled_disk_decode_bytes
    from safa.profiling.memory import LiveTensorPeak
    vae = _vae(torch.float32)
    z = _latent(shape, torch.float32)
    with LiveTensorPeak() as peak:
        band, row = [], 0
        for r, _, piece in tiled_vae.decode_tiles(vae, z, tile=tile, offload="disk"):
            band = [piece] if r != row else band + [piece]
            row = r
    estimate = tiled_disk_decode_bytes(vae.config, z.shape, 4, tile)
    assert peak.peak <= estimate <= 1.6 * peak.peak, (peak.peak, estimate)


# -- wired into the sampler: decode="tiled" / "auto" on images, the streamed PNG ----------------
@pytest.fixture(scope="module")
def jd():
    from safa import JointDiffusion
    from safa.testing import pipelines as tp
    return JointDiffusion(tp.tiny_sd_pipeline(seed=0, sample_size=32))


CALL = dict(width=520, height=256, overlap=0.25, num_inference_steps=1, output_type="pt")


def test_sampler_tiled_decode_equals_the_whole_decode(jd):
    full = jd("a lake", decode="full", generator=torch.Generator().manual_seed(3), **CALL).images
    tiled = jd("a lake", decode="tiled", decode_tile=12, generator=torch.Generator().manual_seed(3), **CALL).images
    assert tiled.shape == full.shape == (1, 3, 256, 520)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


def test_sampler_tiled_decode_of_a_torus_is_the_wrapped_decode(jd):
    # a 2-D canvas looping both ways: the exact tiled decode with circular halos
    out = jd("a wall", decode="tiled", decode_tile=16, loop="both", generator=torch.Generator().manual_seed(4),
             width=352, height=352, overlap=0.25, num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 3, 352, 352)
    seam = (out[..., 0] - out[..., -1]).abs().mean() + (out[..., 0, :] - out[..., -1, :]).abs().mean()
    interior = (out[..., 1:] - out[..., :-1]).abs().mean() + (out[..., 1:, :] - out[..., :-1, :]).abs().mean()
    assert seam < 3 * interior


def _tiled_bytes(adapter, columns, tile, disk=False):
    from safa import memory
    vae = adapter.pipe.vae
    rule = memory.tiled_disk_decode_bytes if disk else memory.tiled_decode_bytes
    return rule(vae.config, adapter.latent_shape(1, columns, 256), torch.empty((), dtype=vae.dtype).element_size(), tile)


def test_auto_decodes_tiled_when_the_whole_decode_does_not_fit(jd, monkeypatch):
    from safa import memory
    adapter = jd.adapter
    whole = adapter.decoder_memory(130, 1, height=256)
    tiled = _tiled_bytes(adapter, 130, 8)
    assert tiled < whole  # at 130 columns in tiles of 8 the tiled decode is the smaller (the rule's premise here)
    monkeypatch.setattr(memory, "available_memory", lambda device: int(whole / memory.WHOLE_DECODE_SHARE))
    assert memory.resolve_decode(adapter, "auto", 130, 32, 1, 256, tile=8) == "full"
    monkeypatch.setattr(memory, "available_memory", lambda device: int(whole / memory.WHOLE_DECODE_SHARE) - 1)
    assert memory.resolve_decode(adapter, "auto", 130, 32, 1, 256, tile=8) == "tiled"
    assert memory.resolve_decode(adapter, "views", 130, 32, 1, 256, grid=True) == "full"
    assert memory.resolve_decode(adapter, "tiled-disk", 130, 32, 1, 256, grid=True) == "tiled-disk"


def test_auto_decodes_on_disk_when_the_tiled_decode_does_not_fit(jd, monkeypatch):
    from safa import memory
    adapter = jd.adapter
    tiled, disk = _tiled_bytes(adapter, 130, 8), _tiled_bytes(adapter, 130, 8, disk=True)
    assert disk < tiled
    monkeypatch.setattr(memory, "available_memory", lambda device: int(tiled / memory.WHOLE_DECODE_SHARE))
    assert memory.resolve_decode(adapter, "auto", 130, 32, 1, 256, tile=8) == "tiled"
    monkeypatch.setattr(memory, "available_memory", lambda device: int(tiled / memory.WHOLE_DECODE_SHARE) - 1)
    assert memory.resolve_decode(adapter, "auto", 130, 32, 1, 256, tile=8) == "tiled-disk"
    # where the disk store's estimate is no smaller (tiles as high as the image: its band dominates), in memory
    assert _tiled_bytes(adapter, 130, 32, disk=True) >= _tiled_bytes(adapter, 130, 32)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    assert memory.resolve_decode(adapter, "auto", 130, 32, 1, 256, tile=32) == "tiled"


class _StoreSpy:
    """Records the ``offload`` of every tiled decode (``tiled_vae.tile_store``'s argument)."""

    def __init__(self, monkeypatch):
        self.offloads = []
        store = tiled_vae.tile_store

        def spy(offload):
            self.offloads.append(offload)
            return store(offload)
        monkeypatch.setattr(tiled_vae, "tile_store", spy)


def test_auto_with_little_memory_decodes_on_disk_as_the_whole_decode(jd, monkeypatch):
    from safa import memory
    full = jd("a lake", decode="full", generator=torch.Generator().manual_seed(3), **CALL).images
    whole = jd.adapter.decoder_memory(65, 1, height=256)
    assert _tiled_bytes(jd.adapter, 65, 32) > whole  # so auto goes from whole to the disk store
    monkeypatch.setattr(memory, "available_memory", lambda device: int(whole / memory.WHOLE_DECODE_SHARE) - 1)
    assert jd.estimate_memory(width=520, height=256, overlap=0.25, output_type="pt").decode == "tiled-disk"
    spy = _StoreSpy(monkeypatch)
    auto = jd("a lake", generator=torch.Generator().manual_seed(3), **CALL).images
    assert spy.offloads == ["disk"]
    assert auto.shape == full.shape == (1, 3, 256, 520)
    torch.testing.assert_close(auto, full, rtol=0, atol=1e-5)


def test_forced_disk_decode_equals_the_whole_decode(jd, monkeypatch):
    full = jd("a lake", decode="full", generator=torch.Generator().manual_seed(3), **CALL).images
    spy = _StoreSpy(monkeypatch)
    disk = jd("a lake", decode="tiled-disk", decode_tile=12, generator=torch.Generator().manual_seed(3),
              **CALL).images
    assert spy.offloads == ["disk"]
    torch.testing.assert_close(disk, full, rtol=0, atol=1e-5)
    assert jd.estimate_memory(width=520, height=256, overlap=0.25, decode="tiled-disk").decode == "tiled-disk"


def test_refusal_names_the_disk_store_when_even_it_does_not_fit(jd, monkeypatch):
    from safa import memory
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)
    with pytest.raises(memory.InsufficientMemoryError, match="even with the decode's tiles kept on disk"):
        jd.estimate_memory(width=520, height=256, overlap=0.25, output_type="pt", check=True)
    # forced whole, where the disk store fits: the advice names it
    found = jd.estimate_memory(width=520, height=256, overlap=0.25, output_type="pt", decode="tiled-disk")
    monkeypatch.setattr(memory, "available_memory", lambda device: found.peak)
    with pytest.raises(memory.InsufficientMemoryError, match="decode='tiled-disk' .* fits"):
        jd.estimate_memory(width=520, height=256, overlap=0.25, output_type="pt", decode="full", check=True)


def test_disk_decode_is_refused_without_an_exact_tiled_vae():
    from types import SimpleNamespace
    from safa.request import _check_scalars
    audio = SimpleNamespace(kind="audio", pipe=SimpleNamespace(vae=None), check_decode=lambda decode: None)
    with pytest.raises(ValueError, match="decode='tiled-disk'.* image pipelines"):
        _check_scalars(audio, 1, None, "tiled-disk", None, None)


def test_streamed_png_is_the_in_memory_image(jd, tmp_path):
    import numpy as np
    from PIL import Image
    target = tmp_path / "lake.png"
    kw = dict(CALL, output_type="np")
    image = jd("a lake", decode="tiled", decode_tile=12, generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert jd("a lake", decode="tiled", decode_tile=12, generator=torch.Generator().manual_seed(3),
              output_path=str(target), **CALL) is not None
    with Image.open(target) as png:
        written = np.asarray(png.convert("RGB"))
    assert written.shape == (256, 520, 3)
    assert np.array_equal(written, (image * 255).round().astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["lake.png"]  # no temporary file left
    # the same with the tiles on disk: the disk decode's own image, exactly (the in-memory one to float rounding)
    on_disk = tmp_path / "lake-disk.png"
    image = jd("a lake", decode="tiled-disk", decode_tile=12, generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert jd("a lake", decode="tiled-disk", decode_tile=12, generator=torch.Generator().manual_seed(3),
              output_path=str(on_disk), **CALL) is not None
    with Image.open(on_disk) as png:
        written_on_disk = np.asarray(png.convert("RGB"))
    assert np.array_equal(written_on_disk, (image * 255).round().astype(np.uint8))
    assert np.abs(written_on_disk.astype(int) - written).max() <= 1


def test_png_rows_round_trip_and_refuse_a_short_image(tmp_path):
    import numpy as np
    from PIL import Image

    from safa.output import PngRows
    rgb = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    writer = PngRows(str(tmp_path / "a.png"), 29, 37)
    for start in range(0, 37, 10):
        writer.write(rgb[start:start + 10])
    writer.close()
    with Image.open(tmp_path / "a.png") as png:
        assert np.array_equal(np.asarray(png), rgb)
    short = PngRows(str(tmp_path / "b.png"), 29, 37)
    short.write(rgb[:10])
    with pytest.raises(ValueError, match="the PNG has 10 of its 37 rows"):
        short.close()
    with pytest.raises(ValueError, match="a band of 29 x 3 uint8 pixels"):
        PngRows(str(tmp_path / "c.png"), 29, 37).write(rgb[:, :5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_image_family_decodes_tiled_as_whole(family):
    # each family's own un-normalisation (scaling, shift, SDXL's latents mean / std) is applied
    from safa.adapters import get_adapter
    from safa.decode import decode_full, decode_tiled, exact_tiled
    from safa.testing import pipelines as tp
    adapter = get_adapter(getattr(tp, f"tiny_{family}_pipeline")(seed=0))
    assert exact_tiled(adapter)
    latent = _latent(adapter.latent_shape(1, 40, None), torch.float32)
    full, tiled = decode_full(adapter, latent, False), decode_tiled(adapter, latent, False, 12)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
