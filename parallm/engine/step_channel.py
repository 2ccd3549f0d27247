"""The tensor-parallel driver's messages to its workers, over a gloo process group.

Once, the worker spec (pickled, ``broadcast_object_list``). Then commands: a fixed int64
header broadcast from rank 0 and, for a step, one int64 payload holding every array of the
step's ``StepInputs`` and the prompt-logprob rows; no pickling per step. A broadcast returns on
rank 0 only once every receiver has taken it, so the driver sends only while the workers wait
for a command (never while they may be inside a step's collectives).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from parallm.engine.step_inputs import StepInputs


class StepChannel:
    """The driver's commands to the workers over a gloo group: a fixed int64 header, then,
    for a step, one int64 payload holding every array of it. The header's words: the command,
    its argument (blocks to allocate), and the length of each payload array."""

    STEP, ALLOCATE, CLOSE, NOOP, PLAN, CAPTURE, GRAPH_STEP = 1, 2, 3, 4, 5, 6, 7
    # The payload's arrays in order, with the dtype the runner reads each in.
    _ARRAYS = (
        ("input_ids", np.int64), ("positions", np.int64), ("slot_mapping", np.int64),
        ("query_start_loc", np.int32), ("seq_lens", np.int32), ("block_tables", np.int32),
        ("sample_indices", np.int64), ("prompt_rows", np.int64),
    )  # fmt: skip
    # A graph step's arrays: ``DecodeGraphs.run``'s arguments, in order.
    _GRAPH_ARRAYS = (
        ("input_ids", np.int64), ("positions", np.int64), ("slot_mapping", np.int64),
        ("seq_lens", np.int32), ("block_tables", np.int32),
    )  # fmt: skip
    _HEADER = 3 + len(_ARRAYS)  # command, argument, block table width, array lengths

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send_spec(self, spec: object) -> None:
        dist.broadcast_object_list([spec], src=0, group=self.group)

    def recv_spec(self) -> object:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def send_command(self, command: int, argument: int = 0) -> None:
        header = torch.zeros(self._HEADER, dtype=torch.int64)
        header[:2] = torch.tensor([command, argument])
        dist.broadcast(header, src=0, group=self.group)

    def send_step(self, inputs: StepInputs, prompt_rows: np.ndarray | None) -> None:
        arrays = [getattr(inputs, name) for name, _ in self._ARRAYS[:-1]]
        arrays.append(np.zeros(0, np.int64) if prompt_rows is None else prompt_rows)
        header = [self.STEP, int(prompt_rows is not None), inputs.block_tables.shape[1]]
        header += [a.size for a in arrays]
        dist.broadcast(torch.tensor(header, dtype=torch.int64), src=0, group=self.group)
        payload = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays])
        dist.broadcast(torch.from_numpy(payload), src=0, group=self.group)

    def send_graph_step(self, arrays: tuple[np.ndarray, ...]) -> None:
        """A decode step that every rank replays from its captured graph (``GRAPH_STEP``)."""
        header = [self.GRAPH_STEP, 0, arrays[-1].shape[1]] + [a.size for a in arrays]
        header += [0] * (self._HEADER - len(header))
        dist.broadcast(torch.tensor(header, dtype=torch.int64), src=0, group=self.group)
        payload = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays])
        dist.broadcast(torch.from_numpy(payload), src=0, group=self.group)

    def recv(
        self,
    ) -> tuple[int, int, StepInputs | tuple[np.ndarray, ...] | None, np.ndarray | None]:
        """(command, argument, the step's inputs and prompt rows when the command is STEP;
        ``DecodeGraphs.run``'s arrays and None for GRAPH_STEP)."""
        header = torch.empty(self._HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        command, argument, width, *sizes = header.tolist()
        if command not in (self.STEP, self.GRAPH_STEP):
            return command, argument, None, None
        names = self._ARRAYS if command == self.STEP else self._GRAPH_ARRAYS
        sizes = sizes[: len(names)]
        payload = torch.empty(sum(sizes), dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.group)
        parts = np.split(payload.numpy(), np.cumsum(sizes)[:-1])
        arrays = {
            name: part.astype(dtype) for (name, dtype), part in zip(names, parts, strict=True)
        }
        arrays["block_tables"] = arrays["block_tables"].reshape(-1, width)
        if command == self.GRAPH_STEP:
            return command, argument, tuple(arrays.values()), None
        rows = arrays.pop("prompt_rows")
        return command, argument, StepInputs(**arrays), rows if argument else None

    def allocate(self, num_blocks: int) -> list[str | None]:
        """Tell the workers to allocate their caches; every rank's error (None: ready)."""
        self.send_command(self.ALLOCATE, num_blocks)
        return self.gather_errors(None)

    def plan(self) -> list[str | None]:
        """Tell the workers to plan their caches; every rank's load error (None: loaded).
        ``min_blocks`` follows only when every rank loaded."""
        self.send_command(self.PLAN)
        return self.share_errors(None)

    def share_errors(self, error: str | None) -> list[str | None]:
        """Every rank's error (None: fine), on every rank (collective)."""
        out: list[str | None] = [None] * self.group.size()
        dist.all_gather_object(out, error, group=self.group)
        return out

    def min_blocks(self, num_blocks: int) -> int:
        """The fewest KV blocks any rank has room for (collective: every rank calls)."""
        box = torch.tensor([num_blocks], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.group)
        return int(box.item())

    def gather_errors(self, error: str | None) -> list[str | None]:
        """Every rank's error (None: fine), on the driver; workers get an empty list."""
        out: list[str | None] | None = [None] * self.group.size() if dist.get_rank() == 0 else None
        dist.gather_object(error, out, dst=0, group=self.group)
        return out or []
