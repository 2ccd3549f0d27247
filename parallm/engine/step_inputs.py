"""A scheduled step as the runner's flat host arrays (``StepInputs``): token ids, positions, KV
slots, query offsets, block tables and the rows to sample; pure functions of the batch and the
cache's block size."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from parallm.engine.scheduler import ScheduledBatch, ScheduledSeq
from parallm.engine.spec.verify import tree_of


@dataclass
class StepInputs:
    """Host-side flat arrays for one step."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    # Rows of the hidden state whose logits the step needs: sampling sequences in batch order,
    # one row each (its last known token), or k+1 for a sequence with k drafts: its last known
    # token's row, then each draft's, in position order (row j predicts the token after j drafts).
    # A draft tree's rows are its nodes', in node order.
    sample_indices: np.ndarray
    # Draft trees only (AttentionMetadata.tree_num_nodes / tree_visible); None in other steps.
    tree_num_nodes: np.ndarray | None = None
    tree_visible: np.ndarray | None = None


def dummy_inputs(num_tokens: int, max_model_len: int, block_size: int) -> StepInputs:
    """``num_tokens`` split into sequences no longer than the model's context."""
    full, rest = divmod(num_tokens, max_model_len)
    lengths = np.array([max_model_len] * full + [rest] * (rest > 0), dtype=np.int64)
    blocks_per_seq = -(-int(lengths.max()) // block_size)
    tables = np.arange(len(lengths) * blocks_per_seq, dtype=np.int32).reshape(len(lengths), -1)
    ends = np.cumsum(lengths)
    positions, slots = positions_and_slots(
        block_size, np.zeros_like(lengths), lengths, ends, tables
    )
    return StepInputs(
        input_ids=np.zeros(num_tokens, dtype=np.int64),
        positions=positions,
        slot_mapping=slots,
        query_start_loc=np.concatenate([[0], ends]).astype(np.int32),
        seq_lens=lengths.astype(np.int32),
        block_tables=tables,
        sample_indices=ends - 1,
    )


def positions_and_slots(
    block_size: int, starts: np.ndarray, lengths: np.ndarray, ends: np.ndarray, tables: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and KV slots of a step's flat tokens, sequence ``i`` computing
    ``lengths[i]`` tokens (ending at row ``ends[i]``) from position ``starts[i]``."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(ends[-1], dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)
    bs = block_size
    return positions, tables[rows, positions // bs].astype(np.int64) * bs + positions % bs


def prepare_staged(batch: ScheduledBatch) -> StepInputs:
    """A step staged on the device (the device drafter's): only its block tables and its
    shape (``q`` rows a sequence, every row sampled) come from the host; its ids,
    positions, slots and lengths are the last step's tail's, on the device."""
    q = 1 + len(batch.seqs[0].draft_token_ids)
    rows = len(batch.seqs) * q
    unused = np.zeros(rows, dtype=np.int64)
    return StepInputs(
        input_ids=unused, positions=unused, slot_mapping=unused,
        query_start_loc=np.arange(0, rows + 1, q, dtype=np.int32),
        seq_lens=np.zeros(len(batch.seqs), dtype=np.int32),
        block_tables=table_rows([it.seq.block_table for it in batch.seqs]),
        sample_indices=np.arange(rows, dtype=np.int64),
    )  # fmt: skip


def prepare(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Flatten the batch: token ids, positions, slots, query offsets, block tables."""
    if batch.is_pure_decode:
        ids, positions, slots, seq_lens, tables = prepare_decode(batch, block_size)
        rows = np.arange(len(ids), dtype=np.int64)
        return StepInputs(ids, positions, slots, np.arange(len(ids) + 1, dtype=np.int32),
                          seq_lens, tables, rows)  # fmt: skip
    # Vectorised over the batch: per sequence only the table row and the token slice are
    # Python (a mixed step carries hundreds of decode rows next to its prompt chunks).
    # A sequence's drafts sit after its known tokens, at the positions that follow.
    items = batch.seqs
    starts = np.fromiter((it.start for it in items), np.int64, len(items))
    lengths = np.fromiter((it.num_scheduled_tokens for it in items), np.int64, len(items))
    ends = np.cumsum(lengths)
    block_tables = table_rows([it.seq.block_table for it in items])
    positions, slots = positions_and_slots(block_size, starts, lengths, ends, block_tables)
    # Tree nodes keep the slots above, in node order, and take the rotary position of
    # their depth: the position each would have on its own path.
    trees = [i for i, it in enumerate(items) if tree_of(it) is not None]
    tree_arrays = _lay_out_trees(items, trees, ends, positions) if trees else (None, None)
    on_device = len(items) - batch.num_admitted if batch.known_on_device else 0
    parts = itertools.chain.from_iterable(
        (_known_ids(it, i < on_device), it.draft_token_ids) for i, it in enumerate(items)
    )
    ids = np.fromiter(itertools.chain.from_iterable(parts), np.int64, int(ends[-1]))
    samples = np.fromiter((it.samples for it in items), bool, len(items))
    num_drafts = np.fromiter((len(it.draft_token_ids) for it in items), np.int64, len(items))
    return StepInputs(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=np.concatenate([[0], ends]).astype(np.int32),
        seq_lens=(starts + lengths).astype(np.int32),
        block_tables=block_tables,
        sample_indices=_sample_rows(ends, samples, num_drafts),
        tree_num_nodes=tree_arrays[0],
        tree_visible=tree_arrays[1],
    )


def prepare_decode(batch: ScheduledBatch, block_size: int) -> tuple[np.ndarray, ...]:
    """Inputs of a pure decode step, with as little per-sequence Python as possible."""
    seqs = [item.seq for item in batch.seqs]
    block_tables = table_rows([s.block_table for s in seqs])
    # The scheduler has counted this step's token as computed. Under async scheduling the
    # token itself may still be on the device (num_tokens lags by one); ids then come in
    # separately and the last known token here is only a placeholder.
    positions = np.fromiter((s.num_computed_tokens - 1 for s in seqs), np.int64, len(seqs))
    ids = np.fromiter((s.token_ids[-1] for s in seqs), np.int64, len(seqs))
    blocks = block_tables[np.arange(len(seqs)), positions // block_size]
    slots = blocks.astype(np.int64) * block_size + positions % block_size
    seq_lens = (positions + 1).astype(np.int32)
    return ids, positions, slots, seq_lens, block_tables


def _known_ids(item: ScheduledSeq, on_device: bool) -> list[int]:
    """The known tokens the step computes for ``item``; a placeholder when they are still on
    the device (one a sequence: the runner writes it from ``device_ids``)."""
    if on_device:
        return [0]
    return item.seq.token_ids[item.start : item.start + item.num_new_tokens]


def _sample_rows(ends: np.ndarray, samples: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """``StepInputs.sample_indices`` of a step whose sequences end at rows ``ends`` (exclusive):
    the last row of each sampling sequence, the last ``1 + num_drafts`` rows of a drafted one."""
    if not num_drafts.any():
        return ends[samples] - 1
    counts = np.where(samples, num_drafts + 1, 0)
    total = int(counts.sum())
    if total == ends[-1]:  # every row samples: a verify step of one-token sequences
        return np.arange(total)
    first = np.repeat(ends - counts, counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return first + offsets


def _lay_out_trees(
    items: list[ScheduledSeq], trees: list[int], ends: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(tree_num_nodes, tree_visible)`` of the step, and each tree node's rotary position
    (its parent's plus one) written into ``positions``; ``trees``: the items with a tree."""
    num_nodes = np.zeros(len(items), dtype=np.int32)
    visible = np.zeros(int(ends[-1]), dtype=np.int64)
    for i in trees:
        tree = tree_of(items[i])
        end = int(ends[i])
        begin = end - len(tree)
        num_nodes[i] = len(tree)
        visible[begin:end] = tree.visible_bits
        positions[begin:end] = positions[begin - 1] + np.asarray(tree.depths)
    return num_nodes, visible


def table_rows(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one zero-padded [rows, longest] int32 array."""
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    if lengths.min() == lengths.max():  # no padding (always so at batch 1)
        return np.array(tables, dtype=np.int32).reshape(len(tables), -1)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(lengths.sum()))
    out = np.zeros((len(tables), int(lengths.max())), dtype=np.int32)
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat  # row-major: each row's prefix
    return out
