"""The op layer's one cache: layouts interned by value, each with the plans built for it.

Two things need equal layouts to be one object with one memo. ``torch.compile`` guards on the
layout's identity (its plan is a constant in the graph), so a fresh-but-equal layout (``ViewLayout`` or ``GridLayout``)
per call would recompile every call. And a plan is built on the host once per
``(layout, op, mode, ...)`` and copied to each device once (``plan.get_plan``), so the
per-step merge allocates nothing, whichever equal layout object the caller holds.

One policy: the :data:`MAX_LAYOUTS` most recently used layouts stay, each with its plans
(host and device copies); the least recently used goes first, plans included, so a
long-lived process generating many lengths does not keep every one. A lookup hashes the
layout's precomputed hash and, for the interned object itself, compares by identity: O(1)
whatever the number of views.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, Tuple

from .layout import AnyLayout

__all__ = ["MAX_LAYOUTS", "intern_layout", "memo"]

MAX_LAYOUTS = 64

Entry = Tuple[AnyLayout, Dict[tuple, object]]  # (the interned layout, its memo: plan key -> plan)

_lock = threading.Lock()  # several threads may merge at once (one per GPU, a data loader)
_entries: "OrderedDict[AnyLayout, Entry]" = OrderedDict()  # least recently used first
# The most recently used entry, which a sampler asks for again every step: found by identity,
# without hashing, locking or reordering (it is already the most recent).
_recent: Tuple[object, Entry] = (None, (None, {}))  # type: ignore[assignment]


def _entry(layout: AnyLayout) -> Entry:
    global _recent
    recent = _recent
    if recent[0] is layout:
        return recent[1]
    with _lock:
        found = _entries.get(layout)
        if found is None:
            found = _entries[layout] = (layout, {})
            while len(_entries) > MAX_LAYOUTS:
                _entries.popitem(last=False)
        else:
            _entries.move_to_end(layout)
        _recent = (layout, found)
        return found


def intern_layout(layout: AnyLayout) -> AnyLayout:
    """The first-seen layout equal to ``layout`` that is still cached (``layout`` itself if none)."""
    return _entry(layout)[0]


def memo(layout: AnyLayout) -> Dict[tuple, object]:
    """The plans cached for layouts equal to ``layout`` (``plan.get_plan`` fills it)."""
    return _entry(layout)[1]
