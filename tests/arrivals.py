"""Requests that arrive while others decode: added to an engine at given steps, as a server
adds them between steps (shared by the engine tests of async scheduling and mixed graphs)."""

from __future__ import annotations

from parallm import LLM, SamplingParams


def run_arrivals(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams], at: list[int]
) -> tuple[dict[str, list[list[int]]], int, int]:
    """Request i (``prompts[i]``, ``params[i]``) added before step ``at[i]``; the outputs by
    request, and the steps the engine took and launched ahead meanwhile."""
    engine = llm.engine
    steps, ahead = engine.num_steps, engine.num_overlapped_steps
    done: dict[str, list[list[int]]] = {}
    for step in range(400):
        for i, when in enumerate(at):
            if when == step:
                engine.add_request(f"r{i}", prompts[i], params[i])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        if step > max(at) and not engine.has_unfinished_requests():
            break
    return done, engine.num_steps - steps, engine.num_overlapped_steps - ahead
