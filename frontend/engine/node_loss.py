"""The engine's side of losing a node (recovery.py keeps the state): pause on a lost node,
re-attach it or re-place its layers, replay every busy slot's tokens into the rebuilt KV cache,
or, when its layers fit nowhere, end the running streams with a 503.

A mixin of `Engine` (engine.py): these run on the engine thread between two steps and use its
slots, KV cells, pipeline, recovery state and `_fail_all`."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from llamarpc.proto.errors import BackendError

from .kv_cells import KVCells
from .placement import PlacementError

if TYPE_CHECKING:
    from .loader import Model
    from .recovery import Recovery
    from .slot import Slot

log = logging.getLogger(__name__)


class _Config(Protocol):      # EngineConfig's fields used here
    node_grace: float
    recover_interval: float


class NodeLoss:
    model: Model
    config: _Config
    slots: list[Slot]
    kv: KVCells
    n_ctx: int
    recovery: Recovery
    health_error: str | None
    _last_recover: float
    _fail_all: Callable[[int, str, str], None]      # Engine's: an error event to every busy slot

    def _reset_cache(self) -> None:
        self.kv = KVCells(self.n_ctx)
        for s in self.slots:
            s.cache = []

    def _rewind_all(self) -> None:
        """The KV cache is gone (a node was re-attached or replaced): every busy slot replays its tokens."""
        kept = {s.id: s.cache for s in self.slots if s.busy}
        self._reset_cache()
        self.recovery.rewind(self.slots, kept)

    def _node_lost(self, message: str) -> None:
        log.error("%s; streams paused (re-attach within %.1f s, else re-place its layers)", message,
                  self.config.node_grace)
        self.health_error = message
        self.recovery.lost(message)
        self._last_recover = 0.0

    def _recover(self, force: bool = False) -> None:
        rec = self.recovery
        now = time.monotonic()
        if not rec.active and not force and now - self._last_recover < self.config.recover_interval:
            return
        self._last_recover = now
        pipeline = self.model.pipeline
        epoch = pipeline.epoch
        how = "re-attached"
        try:
            pipeline.ensure_attached()
        except BackendError as e:
            self.health_error = str(e)
            if not rec.active or not rec.grace_over():
                return
            try:
                pipeline.replace_lost()
            except (PlacementError, BackendError) as e2:
                self._give_up(f"{e}; {e2}")
                return
            how = "re-placed"
        if rec.active:
            n = sum(s.busy for s in self.slots)
            rec.stats.n_streams_resumed += n
            rec.stats.n_reattached += how == "re-attached"
            rec.stats.n_replaced += how == "re-placed"
            log.warning("node %s after a %.1f s pause; %d streams continue", how, now - (rec.since or now), n)
            rec.done()
        if pipeline.epoch != epoch:
            self._rewind_all()
        log.info("all nodes attached again; serving")
        self.health_error = None

    def _give_up(self, message: str) -> None:
        """Neither back nor re-placeable: the running streams end; new requests fail fast until the
        node is back (re-attached every `recover_interval` seconds)."""
        rec = self.recovery
        log.error("%s: ending %d streams", message, sum(s.busy for s in self.slots))
        rec.stats.n_failed += 1
        rec.stats.n_streams_failed += sum(s.busy for s in self.slots)
        rec.done()
        self.health_error = message
        self._fail_all(503, message, "unavailable_error")
        self._reset_cache()
        self._last_recover = time.monotonic()

