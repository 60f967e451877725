"""The pipeline: a model's layer ranges placed on backends, weights uploaded, graphs registered,
and a forward step run stage after stage (each stage gets only its small per-step inputs).

A stage whose node stops answering raises NodeUnavailable naming the node. The next step tries to
re-attach it: a new session, buffers re-made, weights restored from the node's cache (sent again
only when the node does not have them), the graph registered again. Every re-attach bumps `epoch`:
the KV cache contents of all sequences are then gone and the caller must recompute them.

A node that does not come back can be replaced: `replace_lost` places the lost stages' layers on
the nodes still attached (by their free memory; weights from the nodes' caches or sent from the
GGUF), as extra stages in the same order, and bumps `epoch` too. `nodes()` says what each node
is doing (attached, lost, removed) for /health and /metrics.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
from llamarpc.client import Backend, GraphBuilder, TensorRef
from llamarpc.proto.errors import BackendError, NodeUnavailable
from llamarpc.proto.types import GGMLType

from ..model.gguf_file import GGUFFile
from ..model.lora import LoraAdapter
from .lora_stage import StageLora, adapter_bytes, row_scales
from .placement import PlacementError, format_table, human_bytes, place_layers

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]   # (bytes done, bytes total)
MIN_MICRO_BATCH = 32


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclasses.dataclass
class Stage:
    backend: Backend
    layers: range
    first: bool
    last: bool
    names: list[str] = dataclasses.field(default_factory=list)
    weights_buffer: int = 0
    kv_buffer: int = 0
    graph_id: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    bytes_sent: int = 0
    lost: bool = False
    refs: dict[str, TensorRef] = dataclasses.field(default_factory=dict)     # the weights on the node
    kv_refs: dict[int, tuple[TensorRef, TensorRef]] = dataclasses.field(default_factory=dict)  # layer -> K, V
    lora: StageLora = dataclasses.field(default_factory=StageLora)   # LoRA A/B and scale inputs, if any


class Pipeline:
    def __init__(self, gguf: GGUFFile, arch: ModuleType, args: object, backends: Sequence[Backend],
                 n_ctx: int, tensor_split: Sequence[float] | None = None,
                 kv_type: GGMLType = GGMLType.F32, progress: Progress | None = None,
                 adapters: Sequence[LoraAdapter] = ()) -> None:
        self.gguf, self.arch, self.args, self.n_ctx = gguf, arch, args, n_ctx
        self.adapters = list(adapters)
        self.kv_type = kv_type
        self.epoch = 0
        self.n_reattached = 0
        self.replacements: list[dict[str, object]] = []   # one per re-placed stage: layers, from, to
        self._removed: list[str] = []                      # nodes whose layers went elsewhere
        self.pipelined = True   # cut big steps into micro-batches that flow through the nodes at once
        if tensor_split is not None and len(tensor_split) != len(backends):
            raise ValueError(f"tensor split has {len(tensor_split)} values for {len(backends)} backends")
        n_layer = args.n_layer  # type: ignore[attr-defined]
        self._layer_cost = layer_cost = [
            self._cost(arch.tensor_names(args, range(i, i + 1), False, False)) + self._kv_bytes(1)
            for i in range(n_layer)]
        self._first_cost = first_cost = self._cost(arch.tensor_names(args, range(0), True, False))
        self._last_cost = last_cost = self._cost(arch.tensor_names(args, range(0), False, True))
        free = [b.get_memory()[0] for b in backends]
        ranges = place_layers(layer_cost, first_cost, last_cost, free, tensor_split,
                              names=[b.name for b in backends])
        used = [(b, r) for b, r in zip(backends, ranges) if len(r)]
        self.stages = [Stage(b, r, first=i == 0, last=i == len(used) - 1) for i, (b, r) in enumerate(used)]
        for s in self.stages:
            s.names = arch.tensor_names(args, s.layers, s.first, s.last)
            for n in s.names:
                gguf.tensor(n)  # a missing tensor is a load error naming it, before any upload
        total = sum(gguf.tensor(n).nbytes for s in self.stages for n in s.names)
        done = [0]

        def stage_progress(nbytes: int) -> None:
            done[0] += nbytes
            if progress:
                progress(done[0], total)

        t0 = time.perf_counter()
        for s in self.stages:
            self._setup(s, stage_progress)
        log.info("weights placed in %.2f s (%d bytes sent)", time.perf_counter() - t0, self.bytes_sent)

    # -- set-up -----------------------------------------------------------------------------------
    def _cost(self, names: Sequence[str]) -> int:
        """Node memory for these weights: their stored bytes (nodes keep the GGUF blocks as sent)."""
        align = 32
        return sum(_align(self.gguf.tensor(n).nbytes, align) for n in names) + adapter_bytes(self.adapters, names)

    def _kv_bytes(self, n_layers: int) -> int:
        item = 4 if self.kv_type == GGMLType.F32 else 2
        return 2 * n_layers * self.n_ctx * self.args.kv_dim * item  # type: ignore[attr-defined]

    def _map_in_place(self, stage: Stage, align: int) -> dict[str, int] | None:
        """An in-process node reads the stage's tensors straight from the file's memory map when
        they fill one aligned span of it (one stage holding the model): no copy, offsets as in
        the file. Elsewhere (a remote node, a partial stage) None: the bytes are sent."""
        tensors = [self.gguf.tensor(n) for n in stage.names]
        lo = min(t.file_offset for t in tensors)
        hi = max(t.file_offset + t.nbytes for t in tensors)
        if lo % align or any((t.file_offset - lo) % align for t in tensors):
            return None
        if sum(t.nbytes for t in tensors) < 0.98 * (hi - lo):   # would hold bytes nobody uses
            return None
        bid = stage.backend.map_buffer(self.gguf.span(lo, hi))
        if bid is None:
            return None
        stage.weights_buffer, stage.weight_bytes = bid, hi - lo
        return {t.name: t.file_offset - lo for t in tensors}

    def _setup(self, stage: Stage, progress: Callable[[int], None] | None = None) -> None:
        b = stage.backend
        align = b.hello().alignment
        tensors = [self.gguf.tensor(n) for n in stage.names]
        mapped = self._map_in_place(stage, align)
        if mapped is not None:
            offsets = mapped
            if progress:
                progress(sum(t.nbytes for t in tensors))
        else:
            offsets = {}
            size = 0
            for n in stage.names:
                offsets[n] = size
                size = _align(size + self.gguf.tensor(n).nbytes, align)
            stage.weight_bytes = size
            stage.weights_buffer = b.alloc_buffer(size)
            stage.bytes_sent += b.set_tensors([(stage.weights_buffer, offsets[t.name], t.data) for t in tensors],
                                              cache=True, progress=progress,
                                              digests=[self.gguf.digest(t.name) for t in tensors])
        refs = {t.name: TensorRef(stage.weights_buffer, offsets[t.name], t.type, t.shape) for t in tensors}
        kv_dim = self.args.kv_dim  # type: ignore[attr-defined]
        per = _align(self._kv_bytes(1) // 2, align)
        stage.kv_bytes = per * 2 * len(stage.layers)
        stage.kv_buffer = b.alloc_buffer(stage.kv_bytes)
        gb, sent = stage.lora.upload(b, self.adapters, refs, align) if self.adapters else (GraphBuilder(), 0)
        stage.bytes_sent += sent
        stage.refs = refs
        stage.kv_refs = {i: tuple(TensorRef(stage.kv_buffer, (2 * j + h) * per, self.kv_type, (self.n_ctx, kv_dim))
                                  for h in (0, 1)) for j, i in enumerate(stage.layers)}  # type: ignore[misc]
        kv_values = {i: (gb.tensor(k), gb.tensor(v)) for i, (k, v) in stage.kv_refs.items()}
        self.arch.build_graph(gb, self.args, stage.layers, stage.first, stage.last,
                              lambda n: gb.tensor(refs[n]), kv_values)
        stage.lora.check_built(gb, {r: n for n, r in refs.items()})
        stage.graph_id = b.register_graph(gb.build())
        stage.lost = False

    def _mark_lost(self) -> None:
        """A stage is lost with its node: every stage on a node that is down or was lost."""
        down = {id(s.backend) for s in self.stages if s.lost or not s.backend.alive}
        for s in self.stages:
            if id(s.backend) in down:
                s.lost = True

    def ensure_attached(self) -> None:
        """Re-attach every stage whose node was lost; raises NodeUnavailable if one is still down."""
        self._mark_lost()
        reconnected: set[int] = set()
        for s in self.stages:
            if not s.lost:
                continue
            try:
                if id(s.backend) not in reconnected:
                    s.backend.reconnect()
                    reconnected.add(id(s.backend))
                    s.backend.stats.reattaches += 1
                sent = s.bytes_sent
                self._setup(s)
            except BackendError as e:
                s.lost = True
                raise NodeUnavailable(f"node {s.backend.name} (layers {s.layers.start}-{s.layers.stop - 1}) "
                                      f"is down: {e.message}", node=s.backend.name) from None
            self.epoch += 1
            self.n_reattached += 1
            log.warning("node %s re-attached (%d weight bytes re-sent); KV cache cleared",
                        s.backend.name, s.bytes_sent - sent)

    def replace_lost(self) -> None:
        """Place the layers of every lost stage on the nodes still attached, as new stages in the
        same place of the pipeline; the lost nodes are dropped. Raises PlacementError when the
        layers fit on no survivor (or none is left), BackendError when a survivor fails meanwhile.
        Bumps `epoch`: every sequence must be recomputed."""
        self._mark_lost()
        lost = [s for s in self.stages if s.lost]
        if not lost:
            return
        survivors: list[Backend] = []
        for s in self.stages:
            if not s.lost and all(b is not s.backend for b in survivors):
                survivors.append(s.backend)
        if not survivors:
            raise PlacementError("no node is left to take the layers of " + ", ".join(
                sorted({s.backend.name for s in lost})))
        for s in lost:
            free = [b.get_memory()[0] for b in survivors]
            costs = [self._layer_cost[i] for i in s.layers]
            try:
                ranges = place_layers(costs, self._first_cost if s.first else 0, self._last_cost if s.last else 0,
                                      free, names=[b.name for b in survivors])
            except PlacementError as e:
                raise PlacementError(f"layers {s.layers.start}-{s.layers.stop - 1} of lost node {s.backend.name} "
                                     f"fit on no other node: {e}") from None
            pieces = [(b, range(s.layers.start + r.start, s.layers.start + r.stop))
                      for b, r in zip(survivors, ranges) if len(r)]
            new = [Stage(b, r, first=s.first and i == 0, last=s.last and i == len(pieces) - 1)
                   for i, (b, r) in enumerate(pieces)]
            made: list[Stage] = []
            try:
                for ns in new:
                    ns.names = self.arch.tensor_names(self.args, ns.layers, ns.first, ns.last)
                    made.append(ns)
                    self._setup(ns)
            except BackendError:
                for ns in made:
                    self._free(ns)
                raise
            i = self.stages.index(s)
            self.stages[i:i + 1] = new
            to = [f"{ns.backend.name} ({ns.layers.start}-{ns.layers.stop - 1})" for ns in new]
            self.replacements.append({"layers": f"{s.layers.start}-{s.layers.stop - 1}", "from": s.backend.name,
                                      "to": ", ".join(to)})
            log.warning("layers %d-%d of lost node %s re-placed on %s (%d bytes sent)", s.layers.start,
                        s.layers.stop - 1, s.backend.name, ", ".join(to), sum(ns.bytes_sent for ns in new))
        for b in {id(s.backend): s.backend for s in lost}.values():
            self._removed.append(b.name)
            try:
                b.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing %s failed", b.name, exc_info=True)
        self.epoch += 1

    @staticmethod
    def _free(stage: Stage) -> None:
        for bid in (stage.weights_buffer, stage.kv_buffer, stage.lora.buffer):
            if bid:
                try:
                    stage.backend.free_buffer(bid)
                except BackendError:
                    pass

    def nodes(self) -> list[dict[str, object]]:
        """Each node: name, state (attached, lost, removed) and the layers it holds."""
        out: dict[int, dict[str, object]] = {}
        for s in self.stages:
            n = out.setdefault(id(s.backend), {"name": s.backend.name, "state": "attached", "layers": []})
            n["layers"].append(f"{s.layers.start}-{s.layers.stop - 1}")  # type: ignore[union-attr]
            if s.lost or not s.backend.alive:
                n["state"] = "lost"
        rows = [{**n, "layers": ",".join(n["layers"])} for n in out.values()]  # type: ignore[arg-type]
        return rows + [{"name": name, "state": "removed", "layers": ""} for name in self._removed]

    def backends(self) -> list[Backend]:
        """The nodes the stages are on, each once, in pipeline order (for /metrics)."""
        return list({id(s.backend): s.backend for s in list(self.stages)}.values())

    def placement_table(self) -> str:
        rows = []
        for i, s in enumerate(self.stages):
            free, total = s.backend.get_memory()
            rows.append({"node": i, "backend": s.backend.name, "device": s.backend.hello().device,
                         "layers": f"{s.layers.start}-{s.layers.stop - 1}",
                         "weights": human_bytes(s.weight_bytes), "kv cache": human_bytes(s.kv_bytes),
                         "free": f"{human_bytes(free)} of {human_bytes(total)}"})
        return format_table(rows)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.stages)

    def clear_kv(self) -> None:
        for s in self.stages:
            s.backend.clear_buffer(s.kv_buffer, 0)

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, cells: np.ndarray,
                kv_pos: np.ndarray, kv_seq: np.ndarray, out_rows: np.ndarray,
                lora: np.ndarray | None = None) -> np.ndarray:
        """One step over every stage; returns logits F32[len(out_rows), n_vocab]. With adapters,
        `lora` F32[n, n_adapters] is each row's adapter scales (None: the global scales).

        Raises NodeUnavailable (naming the node) when a node is down or was just re-attached (its
        KV cache is then empty, so the step's sequences must be recomputed: see `epoch`)."""
        epoch = self.epoch
        self.ensure_attached()
        if self.epoch != epoch:
            raise NodeUnavailable("a node was re-attached and its KV cache is empty; recompute the sequences",
                                  node=None)
        kv = {"kv_pos": kv_pos.astype(np.int32), "kv_seq": kv_seq.astype(np.int32)}
        out_rows = out_rows.astype(np.int32)
        n = int(tokens.shape[0])
        k = self.micro_batches(n)
        bounds = [n * i // k for i in range(k + 1)]
        scales = row_scales(self.adapters, n, lora) if self.adapters else None
        chunks = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            sel = np.flatnonzero((out_rows >= a) & (out_rows < b))
            chunks.append(({"pos": pos[a:b].astype(np.int32), "seq": seq[a:b].astype(np.int32),
                            "cells": cells[a:b].astype(np.int32), **kv,
                            "out_rows": (out_rows[sel] - a).astype(np.int32)}, tokens[a:b].astype(np.int32), sel))
        # a wavefront: at tick t, stage s works on micro-batch t - s, so the nodes work at once;
        # each node still sees the micro-batches in order (the KV cache of earlier ones is written)
        carry: list[np.ndarray | None] = [tok for _, tok, _ in chunks]
        logits = np.empty((len(out_rows), self.args.n_vocab), np.float32)  # type: ignore[attr-defined]
        n_st = len(self.stages)
        for t in range(k + n_st - 1):
            running = []
            for si, s in enumerate(self.stages):
                c = t - si
                if not 0 <= c < k:
                    continue
                inputs = {key: v for key, v in chunks[c][0].items() if key != "out_rows" or s.last}
                inputs["tokens" if s.first else "hidden"] = carry[c]
                if scales is not None and s.lora.inputs:
                    rows = slice(bounds[c], bounds[c + 1])
                    inputs.update(s.lora.step_inputs(scales, rows, chunks[c][0]["out_rows"]))
                running.append((s, c, s.backend.compute_async(s.graph_id, inputs)))
            for s, c, pending in running:
                try:
                    out = pending.result()
                except NodeUnavailable as e:
                    s.lost = True
                    raise NodeUnavailable(f"node {s.backend.name} (layers {s.layers.start}-{s.layers.stop - 1}) "
                                          f"is gone: {e.message}", node=s.backend.name) from None
                if s.last:
                    logits[chunks[c][2]] = out["logits"]
                    carry[c] = None
                else:
                    carry[c] = out["hidden"]
        return logits

    def micro_batches(self, n_tokens: int) -> int:
        """How many micro-batches a step of n tokens is cut into: one per stage and a bit more to
        shorten the fill and drain of the wavefront, never below MIN_MICRO_BATCH tokens each."""
        if len(self.stages) < 2 or not self.pipelined:
            return 1
        return max(1, min(2 * len(self.stages), n_tokens // MIN_MICRO_BATCH))

    def close(self) -> None:
        for s in self.stages:
            try:
                s.backend.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing %s failed", s.backend.name, exc_info=True)
