"""One generation spread over several processes or GPUs with ``torch.distributed``.

``JointDiffusion(pipe, process_group=group)``: every rank of ``group`` makes the same call;
the views are sharded and only the cells the merge reads across ranks are exchanged. The
design and the exactness argument are in docs/distributed.md; in short:

- **Views.** Rank ``r`` owns a contiguous block of views (:func:`view_blocks`; the larger
  blocks first, so the last rank, which holds the reference window, has the fewest).
  ``J_T`` is drawn whole on every rank from the same generator, exactly as in one process.
  A 2-D grid's tiles are views numbered row-major, so a block is whole rows of tiles plus,
  where the ranks do not divide the rows, a run of the next row's tiles.
- **Model: sharded.** Each rank runs the model on its own views' rows only (plus the
  reference window ``X^0`` on :attr:`ViewShard.reference_rank` while it guides).
- **Scheduler: replicated.** Every rank steps the *whole* batch, with zeros as the model
  output of the rows it does not own (their results are discarded). A scheduler step is a
  few element-wise operations, small beside the model (measured in docs/distributed.md),
  and stepping the same shapes on every rank keeps what a per-rank batch would break:
  diffusers' stochastic schedulers draw the noise of a step with ONE ``randn`` over the
  batch, so every rank draws exactly the numbers one process draws (same generator, same
  shapes, same order), and the reference's scheduler is stepped on every rank too, from the
  model output its owner broadcasts. Stepping only its own rows, each rank would draw the
  *same* first numbers from the shared seed for different views: correlated noise across
  ranks.
- **Exchange.** Before the merge, each rank receives the cells of other ranks' views that
  the merge of its own cells reads, and sends the cells of its views that theirs read.
  These are taken from the merge's own plan (docs/kernels.md section 5), so they are exactly
  right for every mode: the winning half of each overlap in swap mode, every covering cell
  (deeper neighbours included) when averaging, the ring across the seam of a loop; for a
  grid the same over its merged axis of canvas cells (the plan's runs expanded).
- **Merge: the ordinary one.** With its own cells and the received ones current, a rank
  runs the same ``sync_`` with the same plan as one process; every row of that plan reads
  and writes the cells of one column only, so its own cells get the same operations, in
  the same summation order, with the same weights: bitwise the one-process result. (Cells
  of other ranks' views are computed from stale values and discarded.)
- **End.** The views are gathered to rank 0, which stitches and decodes (a grid always: it
  is decoded whole); when a strip's decode is tiled (``decode="tiled"``, or ``"auto"``
  beyond a few windows) every rank gets every view and the ranks decode the tiles
  round-robin, rank 0 receiving each round's tiles in order (and writing them to
  ``output_path`` as they come, so memory stays one round's tiles).

Failures: the call begins with one ``all_gather_object`` of argument digests (different
arguments on different ranks are an error on every rank, before any work); every step's
communication begins with a one-integer ``all_reduce`` of a status flag, and a rank that
raises anywhere enters the next such phase with the flag set, so every rank raises within
one step (the failing rank its own exception, the others :class:`PeerFailure`). A rank that
dies outright is reported by the transport (gloo: at once; NCCL: after the group's timeout).
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import hashlib
import inspect
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from safa_kernels import GridLayout
from safa_kernels.layout import AnyLayout
from safa_kernels.plan import REF_NONE, RUN_COLUMNS, get_plan

from .errors import one_line

__all__ = ["ViewShard", "PeerFailure", "CommunicationError", "view_blocks", "view_cells", "cells_read",
           "exchange_cells", "collective", "agree", "init_from_environment", "rank_of"]


class PeerFailure(RuntimeError):
    """Raised on the ranks of a distributed call that did not fail themselves, when another rank did.

    Attributes:
        failures: ``(rank, exception type name, message)`` of every rank that failed.
    """

    def __init__(self, failures: Sequence[Tuple[int, str, str]], where: str) -> None:
        self.failures = list(failures)
        ranks = ", ".join(str(r) for r, _, _ in self.failures)
        first = self.failures[0]
        super().__init__(f"rank{'s' if len(self.failures) > 1 else ''} {ranks} failed ({where}): "
                         f"{first[1]}: {first[2]}")


class CommunicationError(RuntimeError):
    """A ``torch.distributed`` call of a distributed generation failed (a peer died or timed out)."""


# -- geometry: who owns what, who reads what ------------------------------------------------
def view_blocks(num_views: int, world_size: int) -> List[range]:
    """Contiguous blocks of views, one per rank, sizes differing by at most one (larger first)."""
    if world_size > num_views:
        raise ValueError(f"a distributed generation needs at least one view per process: {world_size} processes "
                         f"for a layout of {num_views} view(s); use at most {num_views} process(es), or a longer "
                         f"output / a smaller overlap")
    q, extra = divmod(num_views, world_size)
    starts = [r * q + min(r, extra) for r in range(world_size + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world_size)]


def view_cells(layout: AnyLayout) -> int:
    """Cells of one view on the merge's axis: a strip's window, a grid tile's ``rows.window * cols.window``
    (the kernels merge a grid's two axes into one, row-major: docs/kernels.md section 8)."""
    return layout.view_cells if isinstance(layout, GridLayout) else layout.window


def _plan_cells(layout: AnyLayout, mode: str, swap_interval: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sources, targets)`` of the ``sync_`` plan, one row per cell (padding -1).

    A grid's plan rows are runs (docs/kernels.md section 8, ``plan.RUN_COLUMNS``): row ``r`` stands
    for the ``rows x count`` cells at ``p + j * step + i * row_stride`` (``j < count``, ``i < rows``,
    the row stride of the operand ``p`` addresses); they are expanded here, so a grid's exchange
    is read off its plan exactly as a strip's is."""
    index, weight, runs = get_plan(layout, "sync", mode, swap_interval, REF_NONE, torch.device("cpu"))
    k = weight.shape[1]
    sources, targets = index[:, 1:1 + k].long(), index[:, 1 + k:].long()
    if runs is None:
        return sources, targets
    if runs.dim() != 2 or runs.shape[1] != len(RUN_COLUMNS):  # the contract this expansion reads
        raise RuntimeError(f"a grid plan's runs must be (rows, {len(RUN_COLUMNS)}) = {RUN_COLUMNS}, "
                           f"got shape {tuple(runs.shape)}")
    runs = runs.long()
    count, step, rows, src_row, out_row = (runs[:, c] for c in range(5))
    cells = count * rows
    row = torch.repeat_interleave(torch.arange(cells.numel()), cells)
    local = torch.arange(row.numel()) - torch.repeat_interleave(torch.cumsum(cells, 0) - cells, cells)
    i, j = local // count[row], local % count[row]  # the cell's canvas row and place in its run

    def expand(positions: torch.Tensor, row_stride: torch.Tensor) -> torch.Tensor:
        shift = (j * step[row] + i * row_stride[row]).unsqueeze(1)
        positions = positions[row]
        return torch.where(positions >= 0, positions + shift, positions)
    return expand(sources, src_row), expand(targets, out_row)


def cells_read(layout: AnyLayout, mode: str, swap_interval: int, views: Sequence[int]) -> torch.Tensor:
    """The cells outside ``views`` that the merge of ``views``' cells reads (sorted flat ``v * cells + k``,
    ``cells`` = :func:`view_cells`; a grid tile's cell ``k = kr * cols.window + kc``).

    ``views``: a rank's block (a ``range``), or any set of view indices (the benchmark counts
    other splits with it). Read off the ``sync_`` plan itself (docs/kernels.md section 5):
    the sources of every row that writes a cell of ``views``. The reference swap reads only
    the cell it writes (or none), so the plan without a reference gives the same set.
    """
    sources, targets = _plan_cells(layout, mode, swap_interval)
    w = view_cells(layout)
    own = torch.zeros(layout.num_views + 1, dtype=torch.bool)  # the last entry: padding (-1)
    own[torch.as_tensor(list(views), dtype=torch.long)] = True

    def inside(cells: torch.Tensor) -> torch.Tensor:
        return own[torch.where(cells >= 0, cells // w, -1)]  # padding (-1) is outside

    read = sources[inside(targets).any(dim=1)]
    return torch.unique(read[(read >= 0) & ~inside(read)])


def exchange_cells(layout: AnyLayout, mode: str, swap_interval: int, blocks: Sequence[range],
                   rank: int) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """``(sends, receives)`` of ``rank`` per step: peer -> the cells (sorted flat ``v * cells + k``)
    it sends to / receives from that peer. Both sides derive a transfer from the same
    :func:`cells_read`, in the same order, so the buffers match without any handshake."""
    w = view_cells(layout)
    owner = torch.empty(layout.num_views, dtype=torch.long)
    for r, block in enumerate(blocks):
        owner[block.start:block.stop] = r
    read = cells_read(layout, mode, swap_interval, blocks[rank])
    sends, receives = {}, {}
    for peer, block in enumerate(blocks):
        if peer == rank:
            continue
        mine = read[owner[read // w] == peer]
        theirs = cells_read(layout, mode, swap_interval, block)
        theirs = theirs[owner[theirs // w] == rank]
        if mine.numel():
            receives[peer] = mine
        if theirs.numel():
            sends[peer] = theirs
    return sends, receives


# -- the per-call protocol ------------------------------------------------------------------
def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _communicate(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (c10d raises RuntimeError / DistBackendError / ...)
        raise CommunicationError(f"{what} failed: {type(exc).__name__}: {one_line(exc)[:500]}") from exc


class _Protocol:
    """The failure protocol of one distributed call (see the module docstring).

    ``open`` is True until the last collective of the call; after it a rank's failure is
    its own (nobody else is listening any more).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.where = "before the denoising loop"
        self.open = True

    def check(self, error: Optional[BaseException] = None) -> None:
        """A status phase: every rank says whether it failed. Raises :class:`PeerFailure` when
        another rank failed and this one did not; returns after reporting when ``error`` is given."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=_comm_device(self.group))
        _communicate("status all_reduce", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group))
        if int(flag.item()) == 0:
            return
        self.open = False
        mine = None if error is None else (type(error).__name__, " ".join(str(error).split())[:2000])
        reports: List[Any] = [None] * self.world_size
        _communicate("failure all_gather", lambda: dist.all_gather_object(reports, mine, group=self.group))
        if error is None:
            raise PeerFailure([(r, *rep) for r, rep in enumerate(reports) if rep is not None], self.where)


_ACTIVE: "contextvars.ContextVar[Optional[_Protocol]]" = contextvars.ContextVar("safa_distributed_call",
                                                                               default=None)


def agree(group: Any, error: Optional[BaseException] = None) -> None:
    """One status phase outside a generation (e.g. the CLI's checks before it): if any rank
    passes an ``error``, every rank raises (that rank its own error, the others :class:`PeerFailure`)."""
    if group is None:
        if error is not None:
            raise error
        return
    protocol = _Protocol(group)
    protocol.where = "while preparing"
    protocol.check(error)
    if error is not None:
        raise error


# -- argument digests -----------------------------------------------------------------------
def _canonical_bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"tensor{value.dtype}{tuple(value.shape)}".encode() + hashlib.sha256(data).digest()
    if isinstance(value, torch.Generator):
        return f"generator{value.device.type}".encode() + _canonical_bytes(value.get_state())
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(_canonical_bytes(v) for v in value) + b"]"
    if isinstance(value, dict):
        return b"{" + b",".join(repr(k).encode() + b":" + _canonical_bytes(v) for k, v in sorted(value.items())) + b"}"
    if inspect.isfunction(value) or inspect.ismethod(value):
        return f"callable {value.__module__}.{value.__qualname__}".encode()
    return repr(value).encode()


def _digest(value: Any) -> str:
    return hashlib.sha256(_canonical_bytes(value)).hexdigest()[:16]


def _pipeline_fingerprint(pipe: Any) -> Dict[str, Any]:
    """What must match across ranks beyond the arguments: classes, scheduler config, dtypes,
    and per module its parameter count and its smallest parameter (cheap, and enough to tell
    two checkpoints or two random initialisations apart; the weights are not hashed whole)."""
    modules = {}
    for name, module in sorted(getattr(pipe, "components", {}).items()):
        if isinstance(module, torch.nn.Module):
            params = list(module.parameters())
            smallest = min(params, key=lambda p: p.numel()) if params else None
            modules[name] = (type(module).__name__, sum(p.numel() for p in params),
                             None if smallest is None else _digest(smallest))
    return {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            # Keys starting with "_" are bookkeeping (e.g. "_use_default_values", listed in
            # set order, which differs between processes).
            "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
            "modules": modules}


def _agree_on_arguments(protocol: _Protocol, jd: Any, arguments: Dict[str, Any], need_seed: bool) -> int:
    """Phase 0: compare digests of every argument on every rank; returns rank 0's seed (when needed)."""
    payload: Dict[str, Any]
    try:
        digests = {name: _digest(value) for name, value in arguments.items()}
        digests["<pipeline>"] = _digest(_pipeline_fingerprint(jd.pipe))
        digests["<JointDiffusion options>"] = _digest((jd.compile, jd.cuda_graphs, jd.merge_step))
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if need_seed and protocol.rank == 0 else 0
        payload = {"digests": digests, "seed": seed, "error": None}
    except Exception as exc:  # noqa: BLE001  (reported to every rank below, then raised here)
        payload = {"error": (type(exc).__name__, str(exc))}
        error: Optional[Exception] = exc
    else:
        error = None
    everyone: List[Any] = [None] * protocol.world_size
    _communicate("argument all_gather", lambda: dist.all_gather_object(everyone, payload, group=protocol.group))
    failed = [(r, *p["error"]) for r, p in enumerate(everyone) if p["error"] is not None]
    if error is not None:
        raise error
    if failed:
        raise PeerFailure(failed, "comparing the arguments")
    differ = sorted({name for p in everyone for name in p["digests"]
                     if any(q["digests"].get(name) != p["digests"][name] for q in everyone)})
    if differ:
        ranks = [r for r, p in enumerate(everyone) if p["digests"] != everyone[0]["digests"]]
        raise ValueError(f"the ranks of a distributed JointDiffusion call must make the same call: "
                         f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''} between rank 0 and rank"
                         f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}")
    return int(everyone[0]["seed"])


def collective(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of ``JointDiffusion.__call__``: the failure protocol around a distributed call.

    With ``self.process_group`` None it calls through. Otherwise: phase 0 (argument digests
    and, for ``generator=None``, a generator seeded from rank 0, so that every rank draws the
    same ``J_T``), then the call; an exception on this rank is reported to the others at
    their next status phase before it propagates.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        group = self.process_group
        if group is None:
            return method(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])  # without self
        protocol = _Protocol(group)
        seed = _agree_on_arguments(protocol, self, arguments, need_seed=arguments.get("generator") is None)
        if "generator" in arguments and arguments["generator"] is None:
            arguments["generator"] = torch.Generator(device=self.adapter.device).manual_seed(seed)
        token = _ACTIVE.set(protocol)
        try:
            return method(self, **arguments)
        except BaseException as exc:
            if protocol.open and not isinstance(exc, (PeerFailure, CommunicationError)):
                protocol.check(exc)
            raise
        finally:
            _ACTIVE.reset(token)

    return call


def rank_of(group: Any) -> int:
    """This process's rank in ``group`` (0 for None: one process)."""
    return 0 if group is None else dist.get_rank(group)


# -- the shard ------------------------------------------------------------------------------
class ViewShard:
    """This process's part of one generation: its views and its communication with the others.

    With ``group=None`` it is the whole layout in one process and every method is the
    identity: the sampler's loop reads the same either way.

    A grid's tiles are sharded the same way: :func:`view_blocks` over the tiles in row-major
    order, so a rank owns whole rows of tiles plus, where the blocks do not divide the rows,
    a run of the next row's tiles (docs/distributed.md, "Grids").

    Args:
        group: the process group (None: one process).
        layout: the views' layout; ``dim`` its long axis in latent coordinates (a grid's
            ``(rows axis, cols axis)``, as the ops take them).
        mode, swap_interval: the merge (what the exchange must carry depends on it).
        rows_per_view: scheduler rows per view (the batch size).
    """

    def __init__(self, group: Any, layout: AnyLayout, dim: Union[int, Tuple[int, int]], mode: str,
                 swap_interval: int, rows_per_view: int) -> None:
        self.group, self.layout, self.rows_per_view = group, layout, rows_per_view
        # The view axes a cell spans, and how a flat cell index splits over them.
        self.dim: Tuple[int, ...] = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        self._cell_axes: Tuple[int, ...] = ((layout.rows.window, layout.cols.window) if isinstance(layout, GridLayout)
                                            else (layout.window,))
        self.rank = rank_of(group)
        self.world_size = 1 if group is None else dist.get_world_size(group)
        self.blocks = view_blocks(layout.num_views, self.world_size)
        self.views: range = self.blocks[self.rank]
        # The last rank has the smallest block (view_blocks puts the larger ones first).
        self.reference_rank = self.world_size - 1
        self.bytes_sent = 0  # by exchange() (strips and reference), for measurements
        # Inside a JointDiffusion call, the call's failure protocol; standalone (benchmarks), its own.
        self._protocol = None if group is None else (_ACTIVE.get() or _Protocol(group))
        # peer -> (views, local index per cell axis): a strip's (views, columns), a grid's (views, rows, cols)
        self._sends: Dict[int, Tuple[torch.Tensor, ...]] = {}
        self._recvs: Dict[int, Tuple[torch.Tensor, ...]] = {}
        self._index_device = torch.device("cpu")
        if group is not None:
            sends, receives = exchange_cells(layout, mode, swap_interval, self.blocks, self.rank)
            self._sends = {peer: self._split(cells) for peer, cells in sends.items()}
            self._recvs = {peer: self._split(cells) for peer, cells in receives.items()}

    def _split(self, cells: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Flat cells ``v * view_cells + k`` as ``(v, k)`` (a strip) or ``(v, kr, kc)`` (a grid, row-major)."""
        parts = []
        for size in reversed(self._cell_axes):
            parts.append(cells % size)
            cells = cells // size
        return (cells, *reversed(parts))

    @property
    def has_reference(self) -> bool:
        """Whether this rank runs the model on the reference window."""
        return self.rank == self.reference_rank

    @property
    def rows(self) -> slice:
        """This rank's rows of the scheduler batch (views x batch items, view-major)."""
        return slice(self.views.start * self.rows_per_view, self.views.stop * self.rows_per_view)

    @property
    def peers(self) -> List[int]:
        """Ranks this one exchanges cells with."""
        return sorted(set(self._sends) | set(self._recvs))

    def whole_batch(self, own_output: torch.Tensor) -> torch.Tensor:
        """The scheduler's model output for every row: this rank's rows, zeros elsewhere."""
        if self.group is None:
            return own_output
        full = own_output.new_zeros((self.layout.num_views * self.rows_per_view, *own_output.shape[1:]))
        full[self.rows] = own_output
        return full

    def begin_step(self, i: int, num_steps: int) -> None:
        if self._protocol is not None:
            self._protocol.where = f"at step {i + 1} of {num_steps}"

    def exchange(self, views: torch.Tensor, reference_output: Optional[torch.Tensor],
                 guiding: bool) -> Optional[torch.Tensor]:
        """The step's one communication phase; returns the reference window's model output.

        Status flag first (raises :class:`PeerFailure` if another rank failed), then, while
        the reference guides, its model output from :attr:`reference_rank` to every rank,
        then the cells the merges read, peer to peer (``views`` is updated in place).
        """
        if self.group is None:
            return reference_output
        self._protocol.check()
        device = _comm_device(self.group)
        if guiding:
            if self.has_reference:
                buf = reference_output.to(device).contiguous()
            else:
                shape = (self.rows_per_view, *views.shape[2:])
                buf = torch.empty(shape, dtype=views.dtype, device=device)
            src = dist.get_global_rank(self.group, self.reference_rank)
            _communicate("reference broadcast", lambda: dist.broadcast(buf, src=src, group=self.group))
            if self.has_reference:
                self.bytes_sent += buf.numel() * buf.element_size() * (self.world_size - 1)
            reference_output = buf.to(views.device)
        # (views, window..., rest...): cells[v, k] (a strip) or cells[v, kr, kc] (a grid) is one cell
        axes = len(self.dim)
        cells = views.movedim(self.dim, tuple(range(1, 1 + axes)))
        if self._index_device != views.device:  # index on the views' device: no copy per step
            self._sends = {p: tuple(x.to(views.device) for x in at) for p, at in self._sends.items()}
            self._recvs = {p: tuple(x.to(views.device) for x in at) for p, at in self._recvs.items()}
            self._index_device = views.device
        ops, received = [], []
        for peer in self.peers:
            if peer in self._sends:
                out = cells[self._sends[peer]].to(device)
                self.bytes_sent += out.numel() * out.element_size()
                ops.append(dist.P2POp(dist.isend, out, dist.get_global_rank(self.group, peer), self.group))
            if peer in self._recvs:
                at = self._recvs[peer]
                buf = torch.empty((at[0].numel(), *cells.shape[1 + axes:]), dtype=views.dtype, device=device)
                received.append((at, buf))
                ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(self.group, peer), self.group))
        if ops:
            def run() -> None:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            _communicate("overlap exchange", run)
        for at, buf in received:
            cells[at] = buf.to(views.device)
        return reference_output

    def gather(self, views: torch.Tensor, everywhere: bool = False) -> Optional[torch.Tensor]:
        """Every view on rank 0 (None on the others), or on every rank with ``everywhere``
        (for :meth:`decode_tiles`). Without ``everywhere`` it is the call's last communication."""
        if self.group is None:
            return views
        protocol = self._protocol
        protocol.where = "after the denoising loop"
        protocol.check()
        pieces = self._gather(views[self.views.start:self.views.stop], everywhere, "view gather")
        if pieces is None:
            return None
        full = torch.empty_like(views)
        for block, piece in zip(self.blocks, pieces):
            full[block.start:block.stop] = piece.to(views.device)
        return full

    def decode_tiles(self, adapter: Any, latent: torch.Tensor, loop: bool, tile: int,
                     count: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """The first ``count`` tiles of the tiled decode of ``latent`` (the same on every rank),
        shared round-robin: in round ``r`` rank ``k`` decodes tile ``r W + k`` and rank 0
        receives the round's tiles.

        On rank 0 it yields ``(first output column, piece)`` in order, as
        :func:`safa.decode.decode_tiles` does in one process, and bitwise the same (a tile's
        output depends on the latent only); the other ranks yield nothing (exhaust it there).
        Rank 0 holds one round's tiles at a time, so an output streamed to a file stays
        bounded. Needs ``count >= world size`` (:meth:`can_share_decode`): every rank decodes
        a tile in the first round, and so knows a tile's shape for the rounds it sits out.
        """
        from .decode import decode_tiles
        assert self.group is not None and self.can_share_decode(count), (self.group, count)
        scale = adapter.decoded_scale * adapter.finalize_scale
        rounds = math.ceil(count / self.world_size)
        idle: Optional[torch.Tensor] = None
        for r in range(rounds):
            first = r * self.world_size
            if first + self.rank < count:
                k = first + self.rank
                ((_, mine),) = decode_tiles(adapter, latent, loop, tile, tiles=range(k, k + 1))
                idle = mine[..., :0]
            else:  # the last round has fewer tiles than ranks
                mine = idle
            self._protocol.where = "while decoding"
            self._protocol.check()
            pieces = self._gather(mine, False, "decoded tile gather", dim=-1, last=r == rounds - 1)
            for j, piece in enumerate(pieces or []):
                if first + j < count:
                    yield (first + j) * tile * scale, piece

    def can_share_decode(self, tiles: int) -> bool:
        """Whether :meth:`decode_tiles` can give every rank a tile of ``tiles``."""
        return self.group is not None and tiles >= self.world_size

    def _gather(self, mine: torch.Tensor, everywhere: bool, what: str, dim: int = 0,
                last: bool = True) -> Optional[List[torch.Tensor]]:
        """Every rank's ``mine`` (sizes may differ on ``dim`` only, padded for the transfer) on
        rank 0, or on every rank; a gather to rank 0 that is the ``last`` communication closes
        the call's protocol."""
        device = _comm_device(self.group)
        sizes = torch.tensor([mine.shape[dim]], device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        _communicate(f"{what} sizes", lambda: dist.all_gather(all_sizes, sizes, group=self.group))
        lengths = [int(x.item()) for x in all_sizes]
        shape = list(mine.shape)
        shape[dim] = max(lengths)
        padded = torch.zeros(shape, dtype=mine.dtype, device=device)
        padded.narrow(dim, 0, mine.shape[dim]).copy_(mine)
        if everywhere:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            _communicate(what, lambda: dist.all_gather(parts, padded, group=self.group))
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
            dst = dist.get_global_rank(self.group, 0)
            _communicate(what, lambda: dist.gather(padded, parts, dst=dst, group=self.group))
            if last:
                self._protocol.open = False
        if parts is None:
            return None
        return [part.narrow(dim, 0, n) for part, n in zip(parts, lengths)]


# -- the command line's process group -------------------------------------------------------
def init_from_environment(timeout_s: float, device: Optional[str] = None) -> Optional[Tuple[Any, torch.device]]:
    """Initialise the default process group from torchrun's environment, if there is one.

    Returns ``(group, device)``, or None when not launched by torchrun with more than one
    process. ``device`` None: NCCL with ``cuda:LOCAL_RANK`` when CUDA is available, else
    gloo on the CPU; ``"cuda"`` or ``"cpu"`` chooses.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"a distributed run's device is cpu (gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK), "
                         f"got {device!r}")
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD, device
