"""Tiled VAE decode and encode for diffusers' ``AutoencoderKL``, equal to the whole decode up to float rounding.

A whole decode of a large image holds several full-resolution activations of the decoder at
once (and the convolutions' workspaces); diffusers' ``vae.enable_tiling()`` bounds that by
decoding overlapping tiles independently and blending them, so every tile normalises with its
own GroupNorm statistics and attends only to itself: the tiles' colours shift (docs/tiled-vae.md
measures it). Here the network runs *layer by layer* over a grid of tiles instead:

- a convolution computes each output tile from its input tile plus the halo of neighbouring
  pixels the kernel reaches (zeros beyond the image, or the other side of it on an axis that
  loops), so every output pixel sees exactly its full-image neighbourhood;
- a GroupNorm first accumulates every tile's sum and sum of squares per group in float64,
  then normalises each tile with the whole image's statistics;
- the mid-block self-attention (at latent resolution) projects keys and values of all tiles,
  then attends per tile of queries, in chunks, over all keys.

The activations of a layer live as a grid of tiles (:class:`TiledTensor`) in the model dtype,
optionally on the host (``offload=True``: the device then holds one tile's work at a time)
or in memory-mapped temporary files (``offload="disk"``, :class:`DiskStore`: resident memory is
one tile's work, whatever the image size).
Memory: the input and the output of one block (a resnet block also its middle
activation), i.e. about 2-3 activations of the widest layer, never the whole decode's
several plus the upsampled copy: nearest upsampling is folded into the next convolution
per tile, GroupNorm + SiLU into the convolution that reads them, and the final pixels are
produced tile by tile (:func:`decode_tiles`), never as one float image. This is not flat in
the image size in memory (the activations of one layer are); docs/tiled-vae.md has the measured peaks.

Public: :func:`decode` (``vae.decode(z).sample``), :func:`decode_tiles` (the output tile by
tile), :func:`encode` (``vae.encode(x).latent_dist``).
"""
from __future__ import annotations

import bisect
import math
import mmap
import tempfile
import weakref
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

__all__ = ["TiledTensor", "TileStore", "DiskStore", "tile_store", "decode", "decode_tiles", "encode", "supports",
           "MIN_TILE", "DEFAULT_TILE", "tile_bounds"]

# Smallest tile side in latent pixels (decode) / latent pixels times the VAE factor (encode).
# Every 3x3 convolution reads one pixel of halo per side; below this the halos are more than a
# quarter of the tile and the tiling costs more than it saves.
MIN_TILE = 8
# Default tile side in latent pixels: 64 (512 px), the SD VAE's own window.
DEFAULT_TILE = 64
# Attention queries per chunk: bounds the (queries x keys) score matrix of a math-path sdpa.
ATTENTION_SCORES = 1 << 22
# Elements of a tile's float64 copy for the GroupNorm sums, a few groups at a time: a float64
# copy of the whole tile would be twice the tile (the peak of the decode kept on disk).
STATS_ELEMENTS = 1 << 21

Bounds = Tuple[int, ...]
Pointwise = Optional[Callable[[torch.Tensor], torch.Tensor]]


def tile_bounds(n: int, tile: int, multiple: int = 1) -> Bounds:
    """Boundaries of ``ceil(n / tile)`` near-equal tiles of ``[0, n)``, each a multiple of ``multiple``."""
    units = n // multiple
    k = max(1, math.ceil(units / max(1, tile // multiple)))
    return tuple((i * units // k) * multiple for i in range(k)) + (n,)


def _segments(bounds: Bounds, lo: int, hi: int, loop: bool) -> List[Tuple[Optional[int], int, int]]:
    """``[lo, hi)`` of an axis cut by ``bounds`` into ``(tile, start, stop)`` pieces (``tile`` None: zeros)."""
    n, out, pos = bounds[-1], [], lo
    while pos < hi:
        p = pos % n if loop else pos
        if p < 0 or p >= n:  # beyond the image, not looping: zero padding up to the edge or the end
            take = min(hi, 0) - pos if p < 0 else hi - pos
            out.append((None, 0, take))
            pos += take
            continue
        k = bisect.bisect_right(bounds, p) - 1
        take = min(hi - pos, bounds[k + 1] - p)
        out.append((k, p - bounds[k], p - bounds[k] + take))
        pos += take
    return out


# -- where a layer's tiles are kept -----------------------------------------------------------
class TileStore:
    """Where the tiles of a layer's activation are kept between layers: on the device that
    computed them (``device`` None) or copied to ``device`` (the host, for ``offload=True``).

    The exact decode needs every layer's activation whole somewhere (its GroupNorm statistics
    are the whole image's); a store decides where. :class:`DiskStore` keeps it in a file.
    """

    # Keys per pass of the attention: None, all at once (one fused call per chunk of queries).
    key_chunk: Optional[int] = None

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device

    def buffer(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty tensor filled piece by piece and read whole (the attention's keys and values),
        on ``device`` (the device computing: it reads them at every query)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def layer(self, rows: Bounds, cols: Bounds) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        """A function keeping tile ``(i, j)`` of a new layer cut at ``rows`` x ``cols``, returning
        the kept tensor (the tiles of one layer share batch, channels and dtype)."""
        return lambda i, j, t: t if self.device is None else t.to(self.device)

    def trim(self) -> None:
        """Give back resident memory the store can re-read later (nothing, for memory)."""


class DiskStore(TileStore):
    """Tiles kept in memory-mapped temporary files, one per layer, in the model dtype.

    Each layer's file is created without a name (``tempfile.TemporaryFile`` in ``directory``,
    default the system's temporary directory), so it is removed when its tiles die, on error,
    interrupt or a killed process alike. Reads come from the page cache; after each tile the
    store drops its pages from the process (``madvise(MADV_DONTNEED)``: the data stays in the
    file), so the process keeps one tile's work resident, not the layer: the kernel writes the
    pages back and evicts them under memory pressure. On the meta device (shape-only runs that
    trace allocations) no file is made; the bytes are counted all the same.

    ``live_bytes`` / ``peak_bytes``: the bytes of the files alive now / at most at once.
    """

    PAGE = mmap.PAGESIZE
    key_chunk = 4096  # keys' pages resident at once in the attention, whatever the image size

    def __init__(self, directory: Optional[str] = None) -> None:
        super().__init__(None)
        self.directory = directory
        self.live_bytes = self.peak_bytes = 0
        self._maps: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()

    def layer(self, rows: Bounds, cols: Bounds) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        tiles: List[List[Optional[torch.Tensor]]] = []

        def put(i: int, j: int, t: torch.Tensor) -> torch.Tensor:
            if not tiles:
                tiles.extend(self._allocate(rows, cols, t))
            kept = tiles[i][j]
            assert kept is not None and kept.shape == t.shape and kept.dtype == t.dtype, (kept, t.shape)
            tiles[i][j] = None  # the layer's TiledTensor holds it from now on
            if not t.is_meta:
                kept.copy_(t)
                self.trim()
            return kept
        return put

    def _allocate(self, rows: Bounds, cols: Bounds, first: torch.Tensor) -> List[List[Optional[torch.Tensor]]]:
        """Empty tiles of a layer cut at ``rows`` x ``cols`` with ``first``'s batch, channels and
        dtype, each page-aligned in one new file (or shape-only, for a meta ``first``)."""
        lead, itemsize = tuple(first.shape[:-2]), first.element_size()
        shapes = [[lead + (r1 - r0, c1 - c0) for c0, c1 in zip(cols, cols[1:])] for r0, r1 in zip(rows, rows[1:])]
        sizes = [[-(-math.prod(shape) * itemsize // self.PAGE) * self.PAGE for shape in row] for row in shapes]
        total = sum(map(sum, sizes))
        if first.is_meta:
            tiles = self._placeholders(shapes, first.dtype, total)
            return tiles  # type: ignore[return-value]
        mapped = self._map(total)
        tiles, offset = [], 0
        for shape_row, size_row in zip(shapes, sizes):
            tiles.append([])
            for shape, size in zip(shape_row, size_row):
                count = math.prod(shape)
                tiles[-1].append(torch.frombuffer(mapped, dtype=first.dtype, count=count, offset=offset).view(shape))
                offset += size
        return tiles

    def buffer(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
        total = -(-math.prod(shape) * itemsize // self.PAGE) * self.PAGE
        if device.type == "meta":
            return self._placeholders([[shape]], dtype, total)[0][0]
        return torch.frombuffer(self._map(total), dtype=dtype, count=math.prod(shape)).view(shape)

    def _map(self, total: int) -> mmap.mmap:
        """``total`` bytes of a new unnamed file in :attr:`directory`, mapped (gone with its last mapping)."""
        with tempfile.TemporaryFile(dir=self.directory) as f:
            f.truncate(total)
            mapped = mmap.mmap(f.fileno(), total)
        self._maps.add(mapped)
        self._count(total)
        weakref.finalize(mapped, self._free, total)
        return mapped

    def _placeholders(self, shapes: List[List[Tuple[int, ...]]], dtype: torch.dtype,
                      total: int) -> List[List[torch.Tensor]]:
        """Meta tensors standing for ``total`` bytes of file: counted here, not as an allocation
        by allocation traces (made outside any dispatch mode)."""
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            tiles = [[torch.empty(shape, dtype=dtype, device="meta") for shape in row] for row in shapes]
        self._count(total)
        weakref.finalize(tiles[0][0], self._free, total)
        return tiles

    def _count(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def trim(self) -> None:
        for m in list(self._maps):
            m.madvise(mmap.MADV_DONTNEED)


Offload = Union[bool, str, TileStore]


def tile_store(offload: Offload) -> TileStore:
    """The :class:`TileStore` an ``offload`` argument names: ``False`` (the device computing),
    ``True`` or ``"host"`` (host memory), ``"disk"`` (a :class:`DiskStore` in the system's
    temporary directory), or a store itself (a :class:`DiskStore` in a directory of your choice)."""
    if isinstance(offload, TileStore):
        return offload
    if offload is False or offload is None:
        return TileStore()
    if offload is True or offload == "host":
        return TileStore(torch.device("cpu"))
    if offload == "disk":
        return DiskStore()
    raise ValueError(f"offload must be False, True / 'host', 'disk' or a TileStore, got {offload!r}")


class TiledTensor:
    """A ``(B, C, H, W)`` activation held as a grid of tiles cut at ``rows`` x ``cols``.

    ``loops`` (rows, cols): the axes that wrap around (a cylinder or a torus), whose halos come
    from the other side. ``store``: where the tiles are kept (:class:`TileStore`), and where the
    layers made from this one keep theirs.
    """

    def __init__(self, tiles: List[List[torch.Tensor]], rows: Bounds, cols: Bounds, loops: Tuple[bool, bool],
                 store: TileStore) -> None:
        self.tiles, self.rows, self.cols, self.loops, self.store = tiles, rows, cols, loops, store

    @classmethod
    def build(cls, rows: Bounds, cols: Bounds, loops: Tuple[bool, bool], store: TileStore,
              fn: Callable[[int, int], torch.Tensor]) -> "TiledTensor":
        """The tiled tensor of tile ``(i, j)`` = ``fn(i, j)``, made in row-major order and kept in ``store``."""
        put = store.layer(rows, cols)
        tiles = [[put(i, j, fn(i, j)) for j in range(len(cols) - 1)] for i in range(len(rows) - 1)]
        return cls(tiles, rows, cols, loops, store)

    @classmethod
    def split(cls, x: torch.Tensor, rows: Bounds, cols: Bounds, loops: Tuple[bool, bool],
              store: TileStore) -> "TiledTensor":
        return cls.build(rows, cols, loops, store,
                         lambda i, j: x[..., rows[i]:rows[i + 1], cols[j]:cols[j + 1]].clone())

    @property
    def grid(self) -> Iterator[Tuple[int, int]]:
        return ((i, j) for i in range(len(self.rows) - 1) for j in range(len(self.cols) - 1))

    def like(self, fn: Callable[[int, int], torch.Tensor]) -> "TiledTensor":
        """A new tiled tensor on the same grid, of tile ``(i, j)`` = ``fn(i, j)`` (a per-tile layer)."""
        return TiledTensor.build(self.rows, self.cols, self.loops, self.store, fn)

    def region(self, r0: int, r1: int, c0: int, c1: int, device: torch.device, pre: Pointwise = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` x cols ``[c0, c1)`` on ``device``, ``pre`` applied to the image's pixels
        (before the zero padding outside it, as a layer applied before a padded convolution)."""
        ref = self.tiles[0][0]
        self.store.trim()
        # filled piece by piece: never the pieces and their concatenation at once
        out = torch.zeros(*ref.shape[:2], r1 - r0, c1 - c0, dtype=ref.dtype, device=device)
        top = 0
        for ti, a, b in _segments(self.rows, r0, r1, self.loops[0]):
            left = 0
            for tj, c, d in _segments(self.cols, c0, c1, self.loops[1]):
                if ti is not None and tj is not None:  # else zeros (``pre`` keeps channels and dtype)
                    piece = self.tiles[ti][tj][..., a:b, c:d].to(device)
                    out[..., top:top + b - a, left:left + d - c] = piece if pre is None else pre(piece)
                left += d - c
            top += b - a
        return out

    def tile(self, i: int, j: int, device: torch.device) -> torch.Tensor:
        self.store.trim()
        return self.tiles[i][j].to(device)

    def assemble(self) -> torch.Tensor:
        return torch.cat([torch.cat(row, -1) for row in self.tiles], -2)


# -- the layers ------------------------------------------------------------------------------
def _conv(x: TiledTensor, conv: torch.nn.Conv2d, device: torch.device, pre: Pointwise = None,
          up: int = 1) -> TiledTensor:
    """``conv(upsample_nearest(pre(x), up))`` tile by tile, each output tile from its exact input neighbourhood.

    ``up``: ``Upsample2D``'s nearest upsampling before its convolution, done per region so the
    upsampled activation never exists whole. Pixels beyond the image read as zeros (the
    convolution's padding, and ``Downsample2D``'s explicit pad after the last row and column),
    or as the other side of the image on an axis that loops.
    """
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or conv.groups != 1 or \
            conv.kernel_size[1] != k or conv.stride[1] != s or conv.padding[1] != p:
        raise ValueError(f"unsupported convolution in the VAE for a tiled decode: {conv}")
    if any(v * up % s for v in x.rows + x.cols):
        raise ValueError(f"tile boundaries and the image size must be multiples of the stride {s}")
    out_rows = tuple(v * up // s for v in x.rows)
    out_cols = tuple(v * up // s for v in x.cols)

    def reads(bounds: Bounds, i: int) -> Tuple[int, int, int, int]:
        # Output [a, b) reads the upsampled input [a*s - p, (b-1)*s - p + k): returned as the
        # input pixels covering it, the offset in their upsampled copy, and the length.
        lo, hi = bounds[i] * s - p, (bounds[i + 1] - 1) * s - p + k
        return lo // up, -(-hi // up), lo - lo // up * up, hi - lo

    def tile(i: int, j: int) -> torch.Tensor:
        ra, rb, roff, h = reads(out_rows, i)
        ca, cb, coff, w = reads(out_cols, j)
        region = x.region(ra, rb, ca, cb, device, pre)
        if up > 1:
            region = F.interpolate(region, scale_factor=float(up), mode="nearest")[..., roff:roff + h, coff:coff + w]
        return F.conv2d(region.to(conv.weight.dtype), conv.weight, conv.bias, stride=s)

    return TiledTensor.build(out_rows, out_cols, x.loops, x.store, tile)


def _norm_stats(x: TiledTensor, norm: torch.nn.GroupNorm, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, channel) ``scale`` and ``shift`` (float64) with which ``norm(x) = x * scale + shift``,
    from the sum and sum of squares of every tile accumulated in float64."""
    g = norm.num_groups
    total = sq = None
    for i, j in x.grid:
        t = x.tile(i, j, device)
        t = t.reshape(t.shape[0], g, -1)
        step = max(1, STATS_ELEMENTS // max(1, t.shape[0] * t.shape[2]))  # groups per float64 copy
        s1 = torch.cat([t[:, k:k + step].double().sum(-1) for k in range(0, g, step)], 1)
        s2 = torch.cat([t[:, k:k + step].double().square().sum(-1) for k in range(0, g, step)], 1)
        total, sq = (s1, s2) if total is None else (total + s1, sq + s2)
    b, c = x.tiles[0][0].shape[:2]
    count = (c // g) * (x.rows[-1] - x.rows[0]) * (x.cols[-1] - x.cols[0])
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(c // g, 1)
    mean = mean.repeat_interleave(c // g, 1)
    weight = norm.weight.double() if norm.affine else torch.ones(c, dtype=torch.float64, device=device)
    bias = norm.bias.double() if norm.affine else torch.zeros(c, dtype=torch.float64, device=device)
    scale = rstd * weight
    shift = bias - mean * scale
    return scale[..., None, None], shift[..., None, None]


def _normalizer(x: TiledTensor, norm: torch.nn.Module, device: torch.device, act: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` (then SiLU when ``act``) as a pointwise function of a piece of ``x``, with the
    whole image's statistics."""
    if not isinstance(norm, torch.nn.GroupNorm):
        raise ValueError(f"unsupported normalisation in the VAE for a tiled decode: {type(norm).__name__}")
    scale64, shift64 = _norm_stats(x, norm, device)
    # Normalised in float32 (float64 for a float64 model), as GroupNorm computes in float32 for half types.
    work = torch.float64 if x.tiles[0][0].dtype == torch.float64 else torch.float32
    scale, shift = scale64.to(work), shift64.to(work)

    def apply(t: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(shift, t.to(work), scale)
        return (F.silu(y, inplace=True) if act else y).to(t.dtype)  # in place: one copy of the piece
    return apply


def _resnet(x: TiledTensor, block: torch.nn.Module, device: torch.device) -> TiledTensor:
    """``ResnetBlock2D`` without a time embedding: norm1, SiLU, conv1, norm2, SiLU, conv2, plus the shortcut."""
    if getattr(block, "time_emb_proj", None) is not None or block.upsample is not None or \
            block.downsample is not None or not isinstance(block.nonlinearity, torch.nn.SiLU):
        raise ValueError("unsupported ResnetBlock2D in the VAE for a tiled decode")
    h = _conv(x, block.conv1, device, pre=_normalizer(x, block.norm1, device, act=True))
    h = _conv(h, block.conv2, device, pre=_normalizer(h, block.norm2, device, act=True))
    factor, sc = block.output_scale_factor, block.conv_shortcut
    if sc is not None and sc.kernel_size != (1, 1):
        x, sc = _conv(x, sc, device), None

    def tile(i: int, j: int) -> torch.Tensor:
        t = x.tile(i, j, device)
        if sc is not None:  # a 1x1 projection needs no halo: made per tile, never whole
            t = F.conv2d(t, sc.weight, sc.bias, stride=sc.stride)
        return (t + h.tile(i, j, device)) / factor
    return h.like(tile)


def _attention(x: TiledTensor, attn: torch.nn.Module, device: torch.device) -> TiledTensor:
    """The mid-block's spatial self-attention: keys and values of every tile, then queries tile
    by tile (in chunks of :data:`ATTENTION_SCORES` scores) over all of them."""
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None or \
            attn.group_norm is None or not attn.residual_connection:
        raise ValueError("unsupported attention in the VAE for a tiled decode")
    norm = _normalizer(x, attn.group_norm, device, act=False)
    heads = attn.heads

    def tokens(i: int, j: int) -> torch.Tensor:
        t = norm(x.tile(i, j, device))
        return t.flatten(2).transpose(1, 2)  # (B, h*w, C)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    key = value = None
    start = 0
    for i, j in x.grid:  # projected into one buffer each, never a list of tiles and its concatenation
        t = tokens(i, j)
        k, v = attn.to_k(t), attn.to_v(t)
        if key is None:
            n = (x.rows[-1] - x.rows[0]) * (x.cols[-1] - x.cols[0])
            key = x.store.buffer((k.shape[0], n, k.shape[2]), k.dtype, k.device)
            value = x.store.buffer((v.shape[0], n, v.shape[2]), v.dtype, v.device)
        key[:, start:start + k.shape[1]], value[:, start:start + v.shape[1]] = k, v
        start += k.shape[1]
        del t, k, v
    key, value = split_heads(key), split_heads(value)
    key_chunk = x.store.key_chunk or key.shape[2]
    chunk = max(1, ATTENTION_SCORES // min(key_chunk, key.shape[2]))

    def attend(query: torch.Tensor) -> torch.Tensor:
        if key_chunk >= key.shape[2]:
            return F.scaled_dot_product_attention(query, key.to(device), value.to(device))
        return _attend_in_chunks(query, key, value, key_chunk, x.store.trim)

    def tile(i: int, j: int) -> torch.Tensor:
        residual = x.tile(i, j, device)
        query = split_heads(attn.to_q(tokens(i, j)))
        out = torch.cat([attend(query[:, :, q:q + chunk]) for q in range(0, query.shape[2], chunk)], 2)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(residual.shape)
        return (out + residual) / attn.rescale_output_factor
    return x.like(tile)


def _attend_in_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_chunk: int,
                      trim: Callable[[], None]) -> torch.Tensor:
    """``scaled_dot_product_attention(query, key, value)`` reading ``key_chunk`` keys at a time
    (keys and values in a file: only those pages are resident), with the running maximum and sum
    of the softmax (the online softmax of flash attention), in float32 at least."""
    work = torch.promote_types(query.dtype, torch.float32)
    q = query.to(work) * query.shape[-1] ** -0.5
    top = total = acc = None
    for start in range(0, key.shape[2], key_chunk):
        trim()
        k = key[:, :, start:start + key_chunk].to(query.device, work)
        v = value[:, :, start:start + key_chunk].to(query.device, work)
        scores = q @ k.transpose(-1, -2)
        new_top = scores.amax(-1, keepdim=True) if top is None else torch.maximum(top, scores.amax(-1, keepdim=True))
        weights = scores.sub_(new_top).exp_()  # in place: one score matrix alive
        if acc is None:
            total, acc = weights.sum(-1, keepdim=True), weights @ v
        else:
            decay = torch.exp(top - new_top)
            total, acc = total * decay + weights.sum(-1, keepdim=True), acc * decay + weights @ v
        top = new_top
        del weights, k, v  # before the next pass's scores
    return (acc / total).to(query.dtype)


def _mid_block(x: TiledTensor, mid: torch.nn.Module, device: torch.device) -> TiledTensor:
    x = _resnet(x, mid.resnets[0], device)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = _attention(x, attn, device)
        x = _resnet(x, resnet, device)
    return x


def _upsample_conv(upsampler: torch.nn.Module) -> torch.nn.Conv2d:
    if upsampler.use_conv_transpose or upsampler.norm is not None or not upsampler.use_conv or \
            not upsampler.interpolate:
        raise ValueError("unsupported Upsample2D in the VAE for a tiled decode")
    return upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0


def _downsample(x: TiledTensor, down: torch.nn.Module, device: torch.device) -> TiledTensor:
    if down.norm is not None or not down.use_conv or down.padding != 0:
        raise ValueError("unsupported Downsample2D in the VAE for a tiled encode")
    return _conv(x, down.conv, device)  # its pad (0, 1, 0, 1) is the zeros beyond the image


# -- the networks ----------------------------------------------------------------------------
def _check_vae(vae: torch.nn.Module) -> None:
    if not (hasattr(vae, "decoder") and hasattr(vae, "encoder") and hasattr(vae.decoder, "up_blocks")):
        raise ValueError(f"a tiled VAE decode needs an AutoencoderKL-style VAE, got {type(vae).__name__}")


def _check_tile(tile: int, name: str = "tile") -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE:
        raise ValueError(f"{name} must be an int >= {MIN_TILE} (latent pixels; every convolution reads a "
                         f"halo of 1 pixel per side), got {tile!r}")
    return tile


def _decoder_tiles(vae: torch.nn.Module, z: torch.Tensor, tile: int, loops: Tuple[bool, bool],
                   store: TileStore) -> Tuple[TiledTensor, Callable[[int, int], torch.Tensor]]:
    """Run the decoder up to its last GroupNorm over tiles; returns that activation and the
    function giving output tile ``(i, j)`` (last norm, SiLU and conv_out of that tile alone)."""
    dec, device = vae.decoder, z.device
    x = TiledTensor.split(z, tile_bounds(z.shape[-2], tile), tile_bounds(z.shape[-1], tile), loops, store)
    if getattr(vae, "post_quant_conv", None) is not None:
        x = _conv(x, vae.post_quant_conv, device)
    x = _conv(x, dec.conv_in, device)
    x = _mid_block(x, dec.mid_block, device)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = _resnet(x, resnet, device)
        for upsampler in block.upsamplers or ():
            conv = _upsample_conv(upsampler)
            x = _conv(x, conv, device, up=2)
    final = x
    norm = _normalizer(final, dec.conv_norm_out, device, act=True)
    conv = dec.conv_out
    if not isinstance(dec.conv_act, torch.nn.SiLU):
        raise ValueError("unsupported decoder activation for a tiled decode")

    def output_tile(i: int, j: int) -> torch.Tensor:
        return _conv(_Window(final, i, j), conv, device, pre=norm).tiles[0][0]
    return final, output_tile


class _Window(TiledTensor):
    """One tile ``(i, j)`` of ``x`` seen as a one-tile grid whose region reads ``x`` (halos included)."""

    def __init__(self, x: TiledTensor, i: int, j: int) -> None:
        super().__init__(x.tiles, (x.rows[i], x.rows[i + 1]), (x.cols[j], x.cols[j + 1]), x.loops, TileStore())
        self.full = x

    def region(self, r0: int, r1: int, c0: int, c1: int, device: torch.device, pre: Pointwise = None) -> torch.Tensor:
        return self.full.region(r0, r1, c0, c1, device, pre)


def _check_latent(vae: torch.nn.Module, z: torch.Tensor) -> None:
    channels = int(vae.config.latent_channels)
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != channels:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a (B, {channels}, h, w) latent, got {shape}")


def decode_tiles(vae: torch.nn.Module, z: torch.Tensor, tile: int = DEFAULT_TILE,
                 loops: Tuple[bool, bool] = (False, False),
                 offload: Offload = False) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``vae.decode(z).sample`` as ``(first row, first column, tile)`` in row-major order, lazily.

    Args:
        vae: a diffusers ``AutoencoderKL`` (SD 1.x / 2.x / XL / 3, Flux: the same decoder).
        z: ``(B, latent_channels, h, w)``, what ``vae.decode`` takes (already unscaled).
        tile: tile side in latent pixels (>= :data:`MIN_TILE`); output tiles are ``scale x`` that.
        loops: (rows, cols) axes that wrap around: every convolution reads its halo from the
            other side, so the image tiles seamlessly as a cylinder (cols) or a torus (both).
        offload: where the tiled activations are kept between layers (:func:`tile_store`):
            ``False`` where they are computed; ``True`` / ``"host"`` in host memory (device
            memory: one tile's work plus the attention's keys and values); ``"disk"`` in
            memory-mapped temporary files (resident memory: the same, whatever the image size).

    Every layer but the last convolution runs over all tiles before the first tile comes out
    (GroupNorm statistics are global); each output tile is then made when it is asked for.
    """
    _check_vae(vae)
    _check_latent(vae, z)
    _check_tile(tile)
    store = tile_store(offload)
    with torch.no_grad():
        final, output_tile = _decoder_tiles(vae, z, tile, loops, store)
        for i, j in final.grid:
            yield final.rows[i], final.cols[j], output_tile(i, j)


def decode(vae: torch.nn.Module, z: torch.Tensor, tile: int = DEFAULT_TILE, loops: Tuple[bool, bool] = (False, False),
           offload: Offload = False) -> torch.Tensor:
    """``vae.decode(z).sample`` computed over tiles (:func:`decode_tiles`), assembled in one tensor."""
    out: Optional[torch.Tensor] = None
    for r, c, piece in decode_tiles(vae, z, tile, loops, offload):
        if out is None:
            scale = 2 ** sum(1 for block in vae.decoder.up_blocks if block.upsamplers)
            out = piece.new_empty(*piece.shape[:2], z.shape[-2] * scale, z.shape[-1] * scale)
        out[..., r:r + piece.shape[-2], c:c + piece.shape[-1]] = piece
    assert out is not None
    return out


def encode(vae: torch.nn.Module, pixels: torch.Tensor, tile: int = DEFAULT_TILE * 8,
           offload: Offload = False) -> "DiagonalGaussianDistribution":
    """``vae.encode(pixels).latent_dist`` computed over tiles, within float rounding of the whole encode.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        pixels: ``(B, in_channels, H, W)`` in ``[-1, 1]`` (what ``vae.encode`` takes), ``H`` and
            ``W`` multiples of the VAE's factor (8 for SD).
        tile: tile side in pixels, a multiple of the VAE's factor, at least ``MIN_TILE`` latent pixels.
        offload: where the tiled activations are kept (:func:`tile_store`, as for :func:`decode_tiles`).

    Returns the latent distribution (``.mean``, ``.sample(generator)``, ``.mode()``); scale it
    as the pipeline does (``* vae.config.scaling_factor``).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    _check_vae(vae)
    enc = vae.encoder
    factor = 2 ** sum(1 for block in enc.down_blocks if block.downsamplers)
    channels = int(vae.config.in_channels)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != channels:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a (B, {channels}, H, W) image (RGB for SD-style VAEs), got {shape}")
    if pixels.shape[-2] % factor or pixels.shape[-1] % factor:
        raise ValueError(f"pixels' height and width must be multiples of {factor} (the VAE's factor), "
                         f"got {tuple(pixels.shape[-2:])}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile % factor or tile // factor < MIN_TILE:
        raise ValueError(f"tile must be an int multiple of {factor} >= {MIN_TILE * factor} (pixels), got {tile!r}")
    device, store = pixels.device, tile_store(offload)
    with torch.no_grad():
        x = TiledTensor.split(pixels.to(enc.conv_in.weight.dtype), tile_bounds(pixels.shape[-2], tile, factor),
                              tile_bounds(pixels.shape[-1], tile, factor), (False, False), store)
        x = _conv(x, enc.conv_in, device)
        for block in enc.down_blocks:
            for resnet in block.resnets:
                x = _resnet(x, resnet, device)
            for down in block.downsamplers or ():
                x = _downsample(x, down, device)
        x = _mid_block(x, enc.mid_block, device)
        if not isinstance(enc.conv_act, torch.nn.SiLU):
            raise ValueError("unsupported encoder activation for a tiled encode")
        x = _conv(x, enc.conv_out, device, pre=_normalizer(x, enc.conv_norm_out, device, act=True))
        if getattr(vae, "quant_conv", None) is not None:
            x = _conv(x, vae.quant_conv, device)
        moments = x.assemble().to(device)
    return DiagonalGaussianDistribution(moments)


def supports(vae: object) -> bool:
    """Whether ``vae`` has the architecture this module runs over tiles (diffusers' ``AutoencoderKL``:
    GroupNorm resnet blocks, nearest upsampling, a mid-block attention)."""
    dec = getattr(vae, "decoder", None)
    return type(vae).__name__ == "AutoencoderKL" and dec is not None and \
        isinstance(getattr(dec, "conv_norm_out", None), torch.nn.GroupNorm) and hasattr(dec, "up_blocks")
