"""torch's own FlashAttention for batches of variable length (``torch.nn.attention.varlen``),
timed beside the package's prefill kernel: a well-kept library that could take the long
prompts where our kernel trails SDPA by 1.23-1.55x (RESULTS, twenty-second session).

The API is a prototype, and its signature differs between torch releases: a paged KV cache
is ``block_table`` with ``seqused_k`` in 2.13, and an append-to-cache ``page_table`` that needs
FlashAttention 3 in others. So the keyword arguments are built from the installed function's
parameters (``varlen_kwargs``), and a release that lacks a form says which instead of a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch


def varlen_function() -> Callable | None:
    """The installed ``varlen_attn``, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kwargs(params: Mapping[str, inspect.Parameter], scale: float, gqa: bool,
                  paged: dict | None = None) -> dict:  # fmt: skip
    """Keyword arguments for a causal call with this signature's ``params``; ``paged``: the
    ``block_table`` and ``seqused_k`` of a paged cache, None for contiguous keys and values.
    NotImplementedError naming the missing parameter where the signature cannot express it."""
    kwargs: dict = {}
    if "scale" in params:
        kwargs["scale"] = scale
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # left unbounded, right 0: causal
    else:
        raise NotImplementedError("varlen_attn takes neither is_causal nor window_size")
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if paged is not None:
        missing = [name for name in paged if name not in params]
        if missing:
            form = " (it has page_table: FlashAttention 3's append form)" if (
                "page_table" in params) else ""  # fmt: skip
            raise NotImplementedError(f"varlen_attn has no {', '.join(missing)}{form}")
        kwargs.update(paged)
    return kwargs


def varlen_runs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tables: torch.Tensor, seq_lens: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, scale: float) -> dict[str, Callable | str]:  # fmt: skip
    """For one prompt that fills its context (``q``: its rows; ``keys``/``values``: its context
    made contiguous, ``[L, Hkv, D]``): a call per form, or why that form cannot run."""
    fn = varlen_function()
    if fn is None:
        return {form: "no torch.nn.attention.varlen here" for form in ("contiguous", "paged")}
    params = inspect.signature(fn).parameters
    gqa = q.shape[1] != keys.shape[1]
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, keys.shape[0]], dtype=torch.int32, device=q.device)
    runs: dict[str, Callable | str] = {}
    forms = {
        "contiguous": (keys, values, None),
        "paged": (k_cache, v_cache, {"block_table": tables, "seqused_k": seq_lens}),
    }
    for form, (k, v, paged) in forms.items():
        try:
            kwargs = varlen_kwargs(params, scale, gqa, paged)
        except NotImplementedError as exc:
            runs[form] = str(exc)
            continue
        runs[form] = lambda k=k, v=v, kwargs=kwargs: fn(
            q, k, v, cu_q, cu_k, q.shape[0], keys.shape[0], **kwargs
        )
    return runs
