"""The pipeline: a model's layer ranges placed on backends, weights uploaded, graphs registered,
and a forward step run stage after stage (each stage gets only its small per-step inputs)."""
from __future__ import annotations

import dataclasses
import logging
import time
from types import ModuleType
from typing import Callable, Sequence

import numpy as np

from llamarpc.client import Backend, GraphBuilder, TensorRef
from llamarpc.proto.types import GGMLType

from .gguf_file import GGUFFile
from .placement import format_table, human_bytes, split_layers

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]   # (bytes done, bytes total)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclasses.dataclass
class Stage:
    backend: Backend
    layers: range
    first: bool
    last: bool
    weights_buffer: int = 0
    kv_buffer: int = 0
    graph_id: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    bytes_sent: int = 0


class Pipeline:
    def __init__(self, gguf: GGUFFile, arch: ModuleType, args: object, backends: Sequence[Backend],
                 n_ctx: int, tensor_split: Sequence[float] | None = None,
                 kv_type: GGMLType = GGMLType.F32, progress: Progress | None = None) -> None:
        self.gguf, self.arch, self.args, self.n_ctx = gguf, arch, args, n_ctx
        self.kv_type = kv_type
        n_layer = args.n_layer  # type: ignore[attr-defined]
        if tensor_split is None:
            tensor_split = [b.get_memory()[0] for b in backends] if len(backends) > 1 else [1.0]
        if len(tensor_split) != len(backends):
            raise ValueError(f"tensor split has {len(tensor_split)} values for {len(backends)} backends")
        ranges = split_layers(n_layer, tensor_split)
        used = [(b, r) for b, r in zip(backends, ranges) if len(r)]
        self.stages = [Stage(b, r, first=i == 0, last=i == len(used) - 1) for i, (b, r) in enumerate(used)]
        self._upload(progress)

    # -- set-up -----------------------------------------------------------------------------------
    def _upload(self, progress: Progress | None) -> None:
        names_per_stage = [self.arch.tensor_names(self.args, s.layers, s.first, s.last) for s in self.stages]
        for names in names_per_stage:
            for n in names:
                self.gguf.tensor(n)  # a missing tensor is a load error naming it, before any upload
        total = sum(self.gguf.tensor(n).nbytes for names in names_per_stage for n in names)
        done = 0
        t0 = time.perf_counter()
        kv_item = 4 if self.kv_type == GGMLType.F32 else 2
        for stage, names in zip(self.stages, names_per_stage):
            b = stage.backend
            align = b.hello().alignment
            offsets: dict[str, int] = {}
            size = 0
            for n in names:
                offsets[n] = size
                size = _align(size + self.gguf.tensor(n).nbytes, align)
            stage.weight_bytes = size
            stage.weights_buffer = b.alloc_buffer(size)
            refs: dict[str, TensorRef] = {}
            for n in names:
                t = self.gguf.tensor(n)
                stage.bytes_sent += b.set_tensor(stage.weights_buffer, offsets[n], t.data, cache=True)
                refs[n] = TensorRef(stage.weights_buffer, offsets[n], t.type, t.shape)
                done += t.nbytes
                if progress:
                    progress(done, total)
            kv_dim = self.args.kv_dim  # type: ignore[attr-defined]
            per = _align(self.n_ctx * kv_dim * kv_item, align)
            stage.kv_bytes = per * 2 * len(stage.layers)
            stage.kv_buffer = b.alloc_buffer(stage.kv_bytes)
            kv = {}
            for j, i in enumerate(stage.layers):
                kv[i] = tuple(TensorRef(stage.kv_buffer, (2 * j + h) * per, self.kv_type, (self.n_ctx, kv_dim))
                              for h in (0, 1))
            gb = GraphBuilder()
            kv_values = {i: (gb.tensor(k), gb.tensor(v)) for i, (k, v) in kv.items()}
            self.arch.build_graph(gb, self.args, stage.layers, stage.first, stage.last,
                                  lambda n, refs=refs: gb.tensor(refs[n]), kv_values)
            stage.graph_id = b.register_graph(gb.build())
        log.info("weights placed in %.2f s", time.perf_counter() - t0)

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
                kv_pos: np.ndarray, kv_seq: np.ndarray, out_rows: np.ndarray) -> np.ndarray:
        """One step over every stage; returns logits F32[len(out_rows), n_vocab]."""
        common = {"pos": pos.astype(np.int32), "seq": seq.astype(np.int32), "cells": cells.astype(np.int32),
                  "kv_pos": kv_pos.astype(np.int32), "kv_seq": kv_seq.astype(np.int32)}
        hidden: np.ndarray | None = None
        for s in self.stages:
            inputs = dict(common)
            if s.first:
                inputs["tokens"] = tokens.astype(np.int32)
            else:
                inputs["hidden"] = hidden
            if s.last:
                inputs["out_rows"] = out_rows.astype(np.int32)
            out = s.backend.compute(s.graph_id, inputs)
            hidden = out["logits"] if s.last else out["hidden"]
        return hidden

    def close(self) -> None:
        for s in self.stages:
            try:
                s.backend.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing %s failed", s.backend.name, exc_info=True)

