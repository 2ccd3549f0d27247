"""The Medusa drafter (method ``medusa``): draft trees from extra heads on the target's hidden
state.

After every step the runner hands over each sampling sequence's final hidden state at the row
its last emitted token was sampled from (``ModelRunner.keep_hidden``; the engine calls
:meth:`MedusaProposer.observe`). Head ``i`` reads it and guesses the token ``i + 2`` positions
after that row, so head 0 guesses the token after the last emitted one: the tree's first level.
The tree is a fixed list of index paths (Medusa's sparse tree, ``speculative_token_tree``):
path ``(r0, .., rd)`` is the node carrying head ``d``'s rank-``rd`` token, below the node of
``(r0, ..)``. One batched forward of the heads and one top-k per step serve every sequence.

A sequence is drafted only while its stored hidden state belongs to its current last token
(``num_tokens`` at the time); the target verifies every node (``DraftVerifier.verify``), so the
heads change speed only, never output. No KV cache of its own: the heads read one vector.
"""

from __future__ import annotations

import heapq

import torch

from parallm.config import EngineConfig, ModelConfig
from parallm.engine.request import Sequence
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.medusa_heads import MedusaHeads, load_medusa_heads
from parallm.engine.spec.tree import MAX_TREE_NODES, DraftTree
from parallm.hub import resolve_model_dir

# Tree sizes of the default tree by number of heads; more heads keep adding 8 nodes.
_DEFAULT_NODES = {1: 4, 2: 12, 3: 20, 4: 28}
# An assumed chance that a head's rank-r guess is right, for ranking default paths: top-1
# guesses dominate, lower ranks fall off fast.
_RANK_PRIOR = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)
HEAD_FILES = ["config.json", "medusa_lm_head.*", "manifest.json"]


def default_tree_paths(num_heads: int) -> tuple[tuple[int, ...], ...]:
    """A sparse tree for ``num_heads`` heads: the index paths of highest prior acceptance
    (the product of ``_RANK_PRIOR`` over the path's ranks), 4 nodes for one head, 12 for two,
    20 for three, 28 for four. Every prefix of a chosen path scores higher, so the set is
    closed under parents; the top-1 chain is always in it."""
    size = min(MAX_TREE_NODES, _DEFAULT_NODES.get(num_heads, 28 + 8 * (num_heads - 4)))
    # Best-first from the root: a child never scores above its parent and is longer, so paths
    # leave the heap in the order (-score, depth, path) without enumerating every path.
    heap = [(-_RANK_PRIOR[r], 1, (r,)) for r in range(len(_RANK_PRIOR))]
    chosen = []
    while heap and len(chosen) < size:
        neg_score, depth, path = heapq.heappop(heap)
        chosen.append(path)
        if depth < num_heads:
            ranks = len(_RANK_PRIOR) if depth < 2 else 3  # deep nodes: only each head's top 3
            for r in range(ranks):
                heapq.heappush(heap, (neg_score * _RANK_PRIOR[r], depth + 1, (*path, r)))
    chain = [(0,) * d for d in range(1, num_heads + 1)]
    chosen = list(dict.fromkeys(chain + chosen))[:size]
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))


class MedusaProposer:
    """Owns the heads and each running sequence's last hidden state; proposes trees.

    Built before the target loads: the heads (small) are read and checked against the target
    here, so a bad folder fails before any expensive work. :meth:`load` moves them to the
    target's device and dtype and asks the runner for hidden states.
    """

    def __init__(self, spec: SpeculativeConfig, target: ModelConfig, config: EngineConfig) -> None:
        if spec.method != "medusa":
            raise ValueError(f"no Medusa heads for speculative_config.method {spec.method!r}")
        if config.tensor_parallel_size > 1:
            raise ValueError(
                "speculative_config method 'medusa' does not run with tensor_parallel_size > 1 "
                "yet: the accepted draft path's KV moves on rank 0 only"
            )
        self.spec = spec
        folder = resolve_model_dir(
            spec.model, field="speculative_config.model", download_dir=config.download_dir,
            patterns=HEAD_FILES, required=("config.json",),
        )  # fmt: skip
        self.heads: MedusaHeads = load_medusa_heads(
            folder, target, "cpu", torch.float32, spec.num_speculative_tokens
        )
        self.paths = spec.speculative_token_tree or default_tree_paths(spec.num_speculative_tokens)
        self.max_rank = max(r for path in self.paths for r in path)
        self.max_model_len = 0
        # seq_id -> (the sequence's num_tokens when observed, its hidden state [H]).
        self.hidden: dict[int, tuple[int, torch.Tensor]] = {}

    def load(self, target, max_model_len: int) -> None:
        """Put the heads next to the loaded target (a ``ModelRunner``) and have its steps keep
        the hidden states the heads read."""
        self.heads = self.heads.to(device=target.device, dtype=target.dtype)
        self.max_model_len = max_model_len
        target.keep_hidden = True

    def target_share(self, num_blocks: int) -> int:
        """Every block stays the target's: the heads keep no KV cache."""
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Nothing to allocate (no KV cache of its own)."""

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """Record each sequence's hidden state ``hidden[i]`` after a step appended its tokens."""
        for seq, row in zip(seqs, hidden, strict=True):
            self.hidden[seq.seq_id] = (seq.num_tokens, row)

    def release(self, running: list[Sequence]) -> None:
        """Forget the hidden states of sequences that are no longer running."""
        live = {seq.seq_id for seq in running}
        for seq_id in [i for i in self.hidden if i not in live]:
            del self.hidden[seq_id]

    def propose(self, seqs: list[Sequence]) -> None:
        """Set ``draft_token_ids`` and ``draft_tree`` of ``seqs`` (draftable sequences) whose
        hidden state is current."""
        ready = []
        for seq in seqs:
            seen = self.hidden.get(seq.seq_id)
            depth = self._max_depth(seq)
            if seen is not None and seen[0] == seq.num_tokens and depth > 0:
                ready.append((seq, seen[1], depth))
        if not ready:
            return
        with torch.inference_mode():
            hidden = torch.stack([row for _, row, _ in ready])
            logits = self.heads(hidden.to(self.heads_dtype))  # [heads, N, V]
            num_heads = max(depth for *_, depth in ready)
            top = logits[:num_heads].topk(self.max_rank + 1, dim=-1).indices.cpu().tolist()
        for i, (seq, _, depth) in enumerate(ready):
            paths = [p for p in self.paths if len(p) <= depth]
            tree = DraftTree.from_paths(paths, lambda head, rank, i=i: top[head][i][rank])
            seq.draft_token_ids = list(tree.tokens)
            seq.draft_tree = tree

    @property
    def heads_dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype

    def _max_depth(self, seq: Sequence) -> int:
        """Tree levels the target could take: within its context and ``max_tokens``."""
        depth = min(self.spec.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        return seq.cap_drafts(depth)
