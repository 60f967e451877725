"""Streams that survive a node loss: the engine's bookkeeping between a lost node and the step
that continues every stream.

When a step fails because a node is gone, the engine keeps its slots (tokens, sampler and its RNG
state, stop-string state) and holds new requests. For `grace` seconds it tries to re-attach the
node; after that it re-places the node's layers on the nodes still attached. Either way the KV
cache is rebuilt by replaying every busy slot's tokens through the pipeline, and each stream
continues from the token where it stopped. Only when the layers fit nowhere are the streams ended
(503) and the service waits for the node as before.

Replay keeps each row's arithmetic as it was the first time where it can: the prompt part of a
slot is replayed in prompt-only steps, the generated part in steps of at most REPLAY_ROWS rows
(the size below which a node's matmul runs the exact row-by-row kernels that a decode step ran),
so with greedy sampling the continued stream equals an undisturbed one (tests/test_node_loss.py).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from .slot import Slot

REPLAY_ROWS = 16


@dataclasses.dataclass
class RecoveryStats:
    n_node_losses: int = 0          # steps that failed with a node gone
    n_reattached: int = 0           # recoveries by re-attaching the node
    n_replaced: int = 0             # recoveries by re-placing its layers on other nodes
    n_failed: int = 0               # losses that ended streams (the layers fit nowhere)
    n_replayed_tokens: int = 0      # tokens recomputed to rebuild the KV cache
    n_streams_resumed: int = 0      # streams continued after a loss
    n_streams_failed: int = 0       # streams ended by a loss


class Recovery:
    def __init__(self, grace: float) -> None:
        if not grace >= 0:
            raise ValueError(f"--node-grace must be a non-negative number of seconds, got {grace}")
        self.grace = grace
        self.since: float | None = None     # when the node was lost (None: nothing to recover)
        self.message = ""
        self.stats = RecoveryStats()
        self._replay: dict[int, tuple[int, int]] = {}   # slot id -> (task id, replay up to this position)

    @property
    def active(self) -> bool:
        return self.since is not None

    def lost(self, message: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.stats.n_node_losses += 1
        self.message = message

    def grace_over(self) -> bool:
        return self.since is not None and time.monotonic() - self.since >= self.grace

    def done(self) -> None:
        self.since = None
        self.message = ""

    # -- replay -----------------------------------------------------------------------------------
    def rewind(self, slots: Sequence[Slot], old_cache: dict[int, list[int]]) -> None:
        """The KV cache was reset: each busy slot feeds its cached tokens again before the rest."""
        for s in slots:
            if s.id in old_cache and s.task is not None:
                n = len(old_cache[s.id])
                s.todo = old_cache[s.id] + s.todo
                self._replay[s.id] = (s.task.id, n)
                self.stats.n_replayed_tokens += n

    def _target(self, s: Slot) -> int:
        entry = self._replay.get(s.id)
        if entry is None or s.task is None or entry[0] != s.task.id or not s.busy or len(s.cache) >= entry[1]:
            self._replay.pop(s.id, None)
            return 0
        return entry[1]

    def parts(self, slots: Sequence[Slot], n_batch: int) -> list[tuple[Slot, int, bool]] | None:
        """The next replay step's (slot, tokens, wants logits), or None when nothing is replayed:
        prompt parts first (up to n_batch tokens), then generated parts (up to REPLAY_ROWS)."""
        todo = [(s, t) for s in slots if (t := self._target(s))]
        if not todo:
            return None
        prompt = [(s, min(t, len(s.task.prompt))) for s, t in todo  # type: ignore[union-attr]
                  if len(s.cache) < min(t, len(s.task.prompt))]  # type: ignore[union-attr]
        out: list[tuple[Slot, int, bool]] = []
        left = n_batch if prompt else REPLAY_ROWS
        for s, end in prompt or todo:
            if left <= 0:
                break
            take = min(end - len(s.cache), left)
            left -= take
            out.append((s, take, False))
        return out
