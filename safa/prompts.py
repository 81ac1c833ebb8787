"""Prompts of a call, as diffusers pipelines take them, mapped onto windows.

As in diffusers, ``prompt`` is one prompt or a *batch* (a list, one output each, times
``num_*_per_prompt``), and ``negative_prompt`` is one or one per batch prompt. Joint
diffusion adds ``view_prompts``: a prompt per view (rain -> thunder -> calm), either one list
shared by the batch or one list per batch prompt. :func:`resolve_prompts` validates all of it
and says, for every output of the batch, which prompt each view and the reference window use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["PromptBatch", "resolve_prompts", "count_prompts", "window_keys", "unique"]


def _is_str_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x)


@dataclass(frozen=True)
class PromptBatch:
    """Per batch prompt ``p``: the prompt of every view, of the reference, and the negative prompt.

    Attributes:
        views: ``views[p][v]``, the prompt of view ``v`` for batch prompt ``p``.
        reference: ``reference[p]``, the reference window's prompt.
        negative: ``negative[p]``, or None for the pipeline's own unconditional branch.
        per_prompt: outputs per batch prompt (``num_waveforms_per_prompt`` / ``num_images_per_prompt``).
    """

    views: Tuple[Tuple[str, ...], ...]
    reference: Tuple[str, ...]
    negative: Optional[Tuple[str, ...]]
    per_prompt: int

    @property
    def num_prompts(self) -> int:
        return len(self.views)

    @property
    def batch_size(self) -> int:
        """Outputs of the call: batch prompts x outputs per prompt."""
        return self.num_prompts * self.per_prompt

    def item(self, b: int) -> int:
        """The batch prompt of output ``b`` (outputs are prompt-major, as in diffusers)."""
        return b // self.per_prompt


def resolve_prompts(prompt: Any, view_prompts: Any, negative_prompt: Any, reference_prompt: Any,
                    per_prompt: int, num_views: int, embeds_rows: Optional[int] = None) -> PromptBatch:
    """Validate the call's prompt arguments for a layout of ``num_views`` views.

    With ``embeds_rows`` (the call gave ``prompt_embeds``), the batch has that many prompts and
    the returned prompts are placeholders: the conditions come from the embeddings.
    """
    if embeds_rows is not None:
        for name, value in (("prompt", prompt), ("view_prompts", view_prompts), ("negative_prompt", negative_prompt),
                            ("reference_prompt", reference_prompt)):
            if value is not None:
                raise ValueError(f"give either prompt_embeds or {name}, not both")
        views = tuple(("",) * num_views for _ in range(embeds_rows))
        return PromptBatch(views, ("",) * embeds_rows, None, per_prompt)

    if view_prompts is not None:
        if prompt is not None:
            raise ValueError("give either prompt (one for every view) or view_prompts (one per view), not both")
        if _is_str_list(view_prompts):
            views = [list(view_prompts)]
        elif isinstance(view_prompts, (list, tuple)) and view_prompts and all(_is_str_list(v) for v in view_prompts):
            views = [list(v) for v in view_prompts]
        else:
            raise ValueError("view_prompts must be a list of str (one per view) or a list of such lists "
                             f"(one per batch prompt), got {view_prompts!r}")
        for v in views:
            if len(v) != num_views:
                raise ValueError(f"view_prompts must have one prompt per view: this layout has {num_views} "
                                 f"view(s) (JointDiffusion.layout_for(...) gives it), got {len(v)}")
    elif isinstance(prompt, str):
        views = [[prompt] * num_views]
    elif _is_str_list(prompt) and len(prompt) > 0:
        views = [[p] * num_views for p in prompt]
    elif prompt is None:
        raise ValueError("give prompt (a str, or a list: one output each), view_prompts or prompt_embeds")
    else:
        raise ValueError(f"prompt must be a str or a non-empty list of str (a batch), got {prompt!r}")
    batch = len(views)

    def per_batch(name: str, value: Any, default: Optional[List[str]]) -> Optional[List[str]]:
        if value is None:
            return default
        if isinstance(value, str):
            return [value] * batch
        if _is_str_list(value) and len(value) == batch:
            return list(value)
        raise ValueError(f"{name} must be a str or a list of {batch} str (one per batch prompt), got {value!r}")

    negative = per_batch("negative_prompt", negative_prompt, None)
    reference = per_batch("reference_prompt", reference_prompt, [v[0] for v in views])
    return PromptBatch(tuple(tuple(v) for v in views), tuple(reference or ()),
                       tuple(negative) if negative is not None else None, per_prompt)


def count_prompts(prompt: Any, view_prompts: Any, embeds_rows: Optional[int] = None) -> int:
    """Batch prompts of a call, read cheaply before :func:`resolve_prompts` validates the arguments."""
    if embeds_rows is not None:
        return embeds_rows
    if view_prompts is not None:
        return 1 if _is_str_list(view_prompts) or not isinstance(view_prompts, (list, tuple)) else max(1, len(view_prompts))
    return len(prompt) if isinstance(prompt, (list, tuple)) and prompt else 1


def window_keys(prompts: PromptBatch, with_reference: bool) -> List[Tuple[str, Optional[str]]]:
    """The (prompt, negative) of every scheduler row: (view, output) view-major, then the reference's outputs."""
    keys: List[Tuple[str, Optional[str]]] = []
    neg = prompts.negative
    n = len(prompts.views[0])
    for v in range(n):
        for b in range(prompts.batch_size):
            p = prompts.item(b)
            keys.append((prompts.views[p][v], neg[p] if neg is not None else None))
    if with_reference:
        for b in range(prompts.batch_size):
            p = prompts.item(b)
            keys.append((prompts.reference[p], neg[p] if neg is not None else None))
    return keys


def unique(items: Sequence[Any]) -> List[Any]:
    """``items`` without repeats, in first-seen order."""
    return list(dict.fromkeys(items))
