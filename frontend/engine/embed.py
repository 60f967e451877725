"""Embeddings and rerank scores: the model's hidden states pooled per input, not logits.

Every stage but the last runs its usual graph; the last stage gets a graph of its own (registered
on its node the first time, again after a re-attach or re-placement) whose output is the final
norm's rows pooled per sequence by the node's POOL op (`none` keeps every row), or, for `rank`,
the classification head's scores (cls.weight + tanh if present, then cls.output). Runs on the
engine thread (Engine.call): the inputs take KV cells of sequences no slot uses and free them
after. An architecture module may bring its own `embed_rows` (bert: the encoder's last rows, pooled
with CLS for rank); decoders get the final norm of their hidden rows. Pooling ids as GGUF's
`{arch}.pooling_type`: 0 none, 1 mean, 2 cls, 3 last, 4 rank.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from llamarpc.client import GraphBuilder, TensorRef, Value
from llamarpc.proto import pb
from llamarpc.proto.errors import BackendError, NodeUnavailable
from llamarpc.proto.types import GGMLType

from .kv_cells import KVCells, make_room

if TYPE_CHECKING:
    from .engine import Engine
    from .loader import Model
    from .pipeline import Pipeline, Stage

log = logging.getLogger(__name__)

POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
POOLING_NAMES = {v: k for k, v in POOLING.items()}
CLS_TENSORS = ("cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias")


class EmbedError(ValueError):
    """A request the embedder cannot serve (too long, no classification head): a 4xx."""


def model_pooling(model: Model) -> int:
    """The GGUF's `{arch}.pooling_type`, 0 (none) when it has none."""
    md = model.gguf.metadata
    v = md.get(f"{md.get('general.architecture')}.pooling_type")
    return int(v) if isinstance(v, int) and v in POOLING_NAMES else 0


class _Capture(GraphBuilder):
    """A GraphBuilder that keeps the layers' `hidden` output as a value to build on."""

    hidden: Value | None = None

    def output(self, name: str, value: Value) -> None:
        if name == "hidden" and self.hidden is None:
            self.hidden = value
        else:
            super().output(name, value)


def has_cls_head(model: Model) -> bool:
    return "cls.output.weight" in model.gguf.tensors or "cls.weight" in model.gguf.tensors


class Embedder:
    def __init__(self, model: Model, pooling: int) -> None:
        if pooling not in POOLING_NAMES:
            raise ValueError(f"unknown pooling type {pooling}")
        self.model, self.pooling = model, pooling
        if pooling == 4 and not has_cls_head(model):
            raise ValueError("--pooling rank needs a model with a classification head (cls.output.weight)")
        self._graphs: dict[tuple[int, int], int] = {}   # (id(stage), epoch) -> graph id on its node
        self._extra: dict[int, int] = {}                  # id(stage) -> buffer of the cls tensors
        self.n_cls_out = int(model.gguf.tensor("cls.output.weight").shape[0]) \
            if "cls.output.weight" in model.gguf.tensors else model.args.n_embd  # type: ignore[attr-defined]

    @property
    def n_embd(self) -> int:
        return self.n_cls_out if self.pooling == 4 else self.model.args.n_embd  # type: ignore[attr-defined]

    # -- the last stage's graph -------------------------------------------------------------------
    def _tensor_refs(self, stage: Stage, names: Sequence[str]) -> dict[str, TensorRef]:
        """Where the stage's tensors are on its node: the offsets its own set-up chose (recomputed the
        same way), plus the classification head's tensors, uploaded here once per stage."""
        gguf = self.model.pipeline.gguf
        align = stage.backend.hello().alignment
        refs: dict[str, TensorRef] = {}
        extra = [n for n in names if n not in stage.names]
        if extra:
            size, offs = 0, {}
            for n in extra:
                offs[n] = size
                size = (size + gguf.tensor(n).nbytes + align - 1) // align * align
            old = self._extra.pop(id(stage), None)
            if old is not None:
                try:
                    stage.backend.free_buffer(old)
                except BackendError:
                    pass        # gone with the node's old session
            bid = self._extra[id(stage)] = stage.backend.alloc_buffer(size)
            stage.backend.set_tensors([(bid, offs[n], gguf.tensor(n).data) for n in extra])
            for n in extra:
                t = gguf.tensor(n)
                refs[n] = TensorRef(bid, offs[n], t.type, t.shape)
        return refs

    def _graph(self, stage: Stage) -> int:
        pl: Pipeline = self.model.pipeline
        key = (id(stage), pl.epoch)
        gid = self._graphs.get(key)
        if gid is not None:
            return gid
        arch, args = pl.arch, pl.args
        gb = _Capture()
        cls = [n for n in CLS_TENSORS if n in pl.gguf.tensors] if self.pooling == 4 else []
        refs = {**stage.refs, **self._tensor_refs(stage, cls)}
        w = lambda n: gb.tensor(refs[n])  # noqa: E731
        kv_values = {i: (gb.tensor(k), gb.tensor(v)) for i, (k, v) in stage.kv_refs.items()}
        rows = getattr(arch, "embed_rows", None)      # an encoder's own (bert)
        if rows is not None:
            h = rows(gb, args, stage.layers, stage.first, w, kv_values)
        else:
            arch.build_graph(gb, args, stage.layers, stage.first, False, w, kv_values)
            assert gb.hidden is not None
            h = gb.mul(gb.rms_norm(gb.hidden, args.rms_eps), w("output_norm.weight"))  # type: ignore[attr-defined]
        pooled = pool_tail(gb, h, self.pooling, decoder=rows is None)
        gb.output("embd", cls_head(gb, pooled, w, cls) if self.pooling == 4 else pooled)
        gid = self._graphs[key] = stage.backend.register_graph(gb.build())
        return gid

    # -- a batch ----------------------------------------------------------------------------------
    def run(self, engine: Engine, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """On the engine thread: each input's vector (pooled) or rows (pooling none), unnormalized."""
        pl: Pipeline = self.model.pipeline
        if engine.health_error is not None or any(s.lost or not s.backend.alive for s in pl.stages):
            raise NodeUnavailable(engine.health_error or "a node is unavailable", node=None)
        cap = engine.config.n_ubatch
        n_pos = self.model.args.n_ctx_train if engine.encoder_only else 0  # type: ignore[attr-defined]
        for x in inputs:
            if not x:
                raise EmbedError("Input content cannot be empty")
            if n_pos and len(x) > n_pos:   # an encoder's positions end at its training context
                raise EmbedError(f"input is too large to process: the input has {len(x)} tokens, the model "
                                 f"takes at most {n_pos}")
            if len(x) > cap:
                raise EmbedError(f"input is too large to process. increase the physical batch size "
                                 f"(the input has {len(x)} tokens, --ubatch-size is {cap})")
        out: list[np.ndarray] = []
        group: list[Sequence[int]] = []
        for x in inputs:
            if group and sum(map(len, group)) + len(x) > cap:
                out += self._group(engine, group)
                group = []
            group.append(x)
        if group:
            out += self._group(engine, group)
        return out

    def _group(self, engine: Engine, group: Sequence[Sequence[int]]) -> list[np.ndarray]:
        kv: KVCells = engine.kv
        make_room(kv, engine.slots, sum(map(len, group)))
        base = len(engine.slots)
        tokens = np.concatenate([np.asarray(x, np.int32) for x in group])
        pos = np.concatenate([np.arange(len(x), dtype=np.int32) for x in group])
        local = np.concatenate([np.full(len(x), j, np.int32) for j, x in enumerate(group)])
        seq = local + base
        cells = kv.alloc(seq, pos)
        try:
            kv_pos, kv_seq = kv.view()
            res = self._forward(tokens, pos, seq, cells, kv_pos, kv_seq, local)
        finally:
            for j in range(len(group)):
                kv.remove(base + j)
        if self.pooling == 0:
            bounds = np.cumsum([0] + [len(x) for x in group])
            return [res[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return list(res)

    def _forward(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, cells: np.ndarray,
                 kv_pos: np.ndarray, kv_seq: np.ndarray, pool_seq: np.ndarray) -> np.ndarray:
        pl: Pipeline = self.model.pipeline
        step = {"pos": pos, "seq": seq, "cells": cells, "kv_pos": kv_pos.astype(np.int32),
                "kv_seq": kv_seq.astype(np.int32)}
        carry: np.ndarray = tokens
        for s in pl.stages:
            inputs = {**step, "tokens" if s.first else "hidden": carry}
            gid = s.graph_id
            if s.last:
                gid = self._graph(s)
                if self.pooling:
                    inputs["pool_seq"] = pool_seq
            try:
                out = s.backend.compute(gid, inputs)
            except NodeUnavailable as e:
                s.lost = True
                raise NodeUnavailable(f"node {s.backend.name} (layers {s.layers.start}-{s.layers.stop - 1}) "
                                      f"is gone: {e.message}", node=s.backend.name) from None
            carry = out["embd" if s.last else "hidden"]
        return np.asarray(carry, np.float32)


def pool_tail(gb: GraphBuilder, h: Value, pooling: int, decoder: bool) -> Value:
    """Rows -> one per sequence (input `pool_seq`, 0-based and dense); `none` keeps the rows. Rank
    pools the last token of a decoder (it alone has seen the whole pair), the first (CLS) of an encoder."""
    if pooling == 0:
        return h
    ps = gb.input("pool_seq", GGMLType.I32, ("n",))
    kind = {1: 1, 2: 2, 3: 3, 4: 3 if decoder else 2}[pooling]
    return gb.op(pb.POOL, h, ps, pooling=kind)


def cls_head(gb: GraphBuilder, x: Value, w, names: Sequence[str]) -> Value:  # noqa: ANN001 - name -> Value
    """llama.cpp's rank head: tanh(cls x + b) if cls.weight is there, then cls.output (+ bias)."""
    if "cls.weight" in names:
        x = gb.matmul(x, w("cls.weight"))
        if "cls.bias" in names:
            x = gb.add(x, w("cls.bias"))
        x = gb.softcap(x, 1.0)      # tanh
    if "cls.output.weight" in names:
        x = gb.matmul(x, w("cls.output.weight"))
        if "cls.output.bias" in names:
            x = gb.add(x, w("cls.output.bias"))
    return x


def attach_embedder(model: Model, engine: Engine, pooling: str | None) -> Embedder:
    """--embeddings: the engine's Embedder (engine.embedder) with --pooling or the model's own."""
    emb = Embedder(model, POOLING[pooling] if pooling is not None else model_pooling(model))
    engine.embedder = emb
    log.info("embeddings on, pooling %s", POOLING_NAMES[emb.pooling])
    return emb
