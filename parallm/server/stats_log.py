"""The server's periodic one-line stats log, as vLLM prints it.

Every interval (10 s by default) the line gives the prompt and generation throughput since the
previous line, the requests running and waiting, the KV cache usage and the prefix-cache hit
rate. It is logged at INFO on the ``parallm`` logger while the server is busy, and once more
when it goes idle; idle intervals after that are logged at DEBUG only. Everything is computed
from the engine snapshots that the engine thread publishes (with data parallelism: the
replicas' counters summed), so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from parallm.server.metrics import EngineSnapshot

logger = logging.getLogger("parallm")

DEFAULT_INTERVAL_S = 10.0


class StatsLog:
    """Turns successive engine snapshots into log lines; ``log()`` once per interval."""

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._last = snapshot()
        self._last_time = clock()
        self._last_had_tokens = False
        # Hit rate of the prompts looked up in the last interval that had any.
        self._hit_rate = 0.0

    def log(self) -> str:
        """Log (and return) the line for the interval since the previous call."""
        now, current = self._clock(), self._snapshot()
        prev, elapsed = self._last, now - self._last_time
        prompt_tokens = current.num_prompt_tokens_computed - prev.num_prompt_tokens_computed
        generated = current.num_generated_tokens - prev.num_generated_tokens
        queries = current.prefix_cache_queries - prev.prefix_cache_queries
        if queries > 0:
            self._hit_rate = (current.prefix_cache_hits - prev.prefix_cache_hits) / queries
        line = (
            f"Avg prompt throughput: {_per_second(prompt_tokens, elapsed):.1f} tokens/s, "
            f"Avg generation throughput: {_per_second(generated, elapsed):.1f} tokens/s, "
            f"Running: {current.num_requests_running} reqs, "
            f"Waiting: {current.num_requests_waiting} reqs, "
            f"GPU KV cache usage: {100 * current.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {100 * self._hit_rate:.1f}%"
        )
        had_tokens = prompt_tokens > 0 or generated > 0
        busy = current.num_requests_running > 0 or current.num_requests_waiting > 0
        # The interval after the last busy one is logged too, so the log shows the drop to 0.
        active = had_tokens or busy or self._last_had_tokens
        logger.log(logging.INFO if active else logging.DEBUG, line)
        self._last, self._last_time, self._last_had_tokens = current, now, had_tokens
        return line


async def log_stats_every(stats: StatsLog, interval_s: float) -> None:
    """Log a line every ``interval_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        stats.log()


def _per_second(count: int, elapsed_s: float) -> float:
    return count / elapsed_s if elapsed_s > 0 else 0.0
