"""Prefetch a decoder layer's next weights into L2 while its attention runs.

At batch 1 a 1B model's decode step is a chain of short kernels. DRAM idles during the
rotary, attention and norm kernels, and the small o projection ramps up and drains before it
reaches full bandwidth (1.3 TB/s on an H100 against 3 TB/s for the large GEMVs). Here, right
after a layer's q/k/v projection is launched, a second stream reads the layer's o projection and
the head of its gate/up projection, so those bytes arrive in L2 (50 MB on an H100) while the
attention kernels run, and the GEMVs that follow hit there. The reads are plain loads that
change nothing; only the timing moves.

Installed from outside the model with forward hooks, and active only for inputs of at most
``max_rows`` rows (decode batches; a large batch is compute-bound and needs no help). Works
inside CUDA-graph capture: the fork and join become graph edges.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_CHUNK_BYTES = 64 * 1024  # bytes one program reads
PREFETCH_MAX_ROWS = 16  # the engine prefetches for decode batches up to this size


def _touch_kernel():  # built on first use: triton only where kernels run
    import triton
    import triton.language as tl

    @triton.jit
    def touch(ptr, n_elem, sink_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
              EVICT: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < n_elem, other=0.0,
                        eviction_policy=EVICT)  # fmt: skip
            acc += x.to(tl.float32)
        total = tl.sum(acc, axis=0)
        # A store that never happens for finite weights keeps the loads from being removed.
        tl.store(sink_ptr + pid, total, mask=total != total)

    return touch


class L2Prefetcher:
    """Forward hooks that prefetch each decoder layer's o and gate/up weights into L2."""

    def __init__(self, megabytes: float, max_rows: int, evict: str = "evict_last") -> None:
        self.budget = int(megabytes * 1e6)
        self.max_rows = max_rows
        self.evict = evict
        self.stream: torch.cuda.Stream | None = None
        self.handles: list[RemovableHandle] = []
        self._sink: torch.Tensor | None = None
        self._kernel = None
        self._pending = False

    def install(self, model: nn.Module) -> int:
        """Hook every decoder layer of ``model``; returns how many were hooked."""
        layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = getattr(attn, "qkv_proj", None)
            gate_up = getattr(mlp, "gate_up_proj", None)
            if qkv is None or gate_up is None:
                raise ValueError("L2 prefetch needs fused projections (model.fuse_projections())")
            targets = [attn.o_proj.weight, gate_up.weight]
            self.handles.append(qkv.register_forward_hook(self._fork_hook(targets)))
        top = model.model if hasattr(model, "model") else model
        self.handles.append(top.register_forward_hook(lambda *_: self._join()))
        return len(layers)

    def remove(self) -> None:
        """Take the hooks off (the model runs as before)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _fork_hook(self, targets: list[torch.Tensor]):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            x = inputs[0]
            rows = x.numel() // x.shape[-1]
            if x.is_cuda and 0 < rows <= self.max_rows:
                self._prefetch(targets)

        return hook

    def _prefetch(self, targets: list[torch.Tensor]) -> None:
        main = torch.cuda.current_stream()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=main.device)
            self._sink = torch.zeros(1 << 16, dtype=torch.float32, device=main.device)
            self._kernel = _touch_kernel()
        self._join()  # the previous layer's prefetch has long finished; keeps one in flight
        self.stream.wait_stream(main)
        budget = self.budget
        with torch.cuda.stream(self.stream):
            for weight in targets:
                nbytes = min(budget, weight.numel() * weight.element_size())
                if nbytes <= 0:
                    break
                self._launch(weight, nbytes)
                budget -= nbytes
        self._pending = True

    def _launch(self, weight: torch.Tensor, nbytes: int) -> None:
        elem = weight.element_size()
        block = 2048
        iters = max(1, _CHUNK_BYTES // (block * elem))
        n_elem = nbytes // elem
        grid = (min(-(-n_elem // (block * iters)), self._sink.numel()),)
        self._kernel[grid](weight, n_elem, self._sink, BLOCK=block, ITERS=iters, EVICT=self.evict)

    def _join(self) -> None:
        if self._pending:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._pending = False
