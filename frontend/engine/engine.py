"""The engine: one thread owns the model and runs continuous batching over `n_parallel` slots.

Every step carries the next token of each decoding slot and chunks of the prompts being
processed, in one Pipeline.forward (split into micro-batches of at most `n_ubatch` tokens). Slot i
is sequence i of the KV cache; the context is shared, each slot getting n_ctx / n_parallel. Tasks
beyond the free slots wait in a FIFO queue. Handlers only submit tasks and read their events; a
cancelled task (client gone) frees its slot before the next step.

A node lost mid-step pauses the streams (recovery.py keeps the state, node_loss.py acts): the engine re-attaches the node within
`node_grace` seconds or re-places its layers on the other nodes, replays every busy slot's tokens
to rebuild the KV cache, and continues each stream where it stopped; new requests wait meanwhile.
Only when the layers fit nowhere do the running requests end with an error event (503); /health
reports the node, and the engine re-attaches it on its own (every `recover_interval` seconds, or
when a new request arrives).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from llamarpc.proto.errors import BackendError, NodeUnavailable

from ..sampling import Sampler
from ..sampling.dry import dry_breakers
from . import step_plan
from .budget import StepBudget
from .context_shift import KVShifter, shift_slot
from .fork import Forks
from .forward import forward_micro_batches
from .kv_cells import KVCells
from .loader import Model
from .node_loss import NodeLoss
from .recovery import Recovery
from .slot import Slot, SlotState, common_prefix
from .speculative import Speculative
from .task import ErrorEvent, Event, FinalEvent, Task, TaskParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineConfig:
    n_parallel: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    prefill_chunk: int = 0          # prompt tokens per step while others decode; 0 = sized by time
    stall_factor: float = 1.4       # ... so that a step takes about this many decode-only steps
    slot_prompt_similarity: float = 0.1
    recover_interval: float = 1.0
    node_grace: float = 5.0         # seconds a lost node has to come back before its layers move
    warmup: bool = True
    context_shift: bool = False     # a full slot drops tokens after n_keep and goes on (context_shift.py)


@dataclasses.dataclass
class EngineMetrics:
    n_prompt_tokens_processed_total: int = 0
    t_prompt_processing_total: float = 0.0
    n_tokens_predicted_total: int = 0
    t_tokens_generation_total: float = 0.0
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    n_tokens_max: int = 0
    n_requests_total: int = 0
    n_draft_total: int = 0              # speculative decoding: draft tokens verified ...
    n_draft_accepted_total: int = 0     # ... and accepted


class Engine(NodeLoss):
    def __init__(self, model: Model, config: EngineConfig | None = None, speculative: Speculative | None = None) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = cfg = config or EngineConfig()
        if cfg.n_parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if cfg.n_batch < 1 or cfg.n_ubatch < 1:
            raise ValueError("batch sizes must be positive")
        self.n_ctx = model.n_ctx
        self.n_ctx_slot = self.n_ctx // cfg.n_parallel
        if self.n_ctx_slot < 2:
            raise ValueError(f"context {self.n_ctx} is too small for {cfg.n_parallel} slots")
        self.kv = KVCells(self.n_ctx)
        self.slots = [Slot(i, self.n_ctx_slot) for i in range(cfg.n_parallel)]
        self.spec = speculative         # drafts for decoding slots, verified in the step (speculative.py)
        for s in self.slots:
            s.context_shift = cfg.context_shift
            s.speculative = speculative is not None
        self.shifter = KVShifter(model.pipeline)
        self.budget = StepBudget(cfg.n_batch, cfg.stall_factor, cfg.prefill_chunk)
        self.metrics = EngineMetrics()
        self.health_error: str | None = None
        self.recovery = Recovery(cfg.node_grace)
        self.forks = Forks()            # n > 1: children waiting for their leader's prompt
        self._inbox: queue.Queue[Task | None] = queue.Queue()
        self._pending: collections.deque[Task] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_recover = 0.0
        self._dry_cache: dict[tuple[str, ...], dict[int, list[tuple[int, ...]]]] = {}
        self._lock = threading.Lock()   # guards _dry_cache for callers on other threads
        self.embedder: object | None = None     # an embed.Embedder with --embeddings
        # called after each step with its kind (decode, prompt, mixed, replay) and seconds (/metrics)
        self.on_step: Callable[[str, float], None] | None = None
        # an encoder (bert) has no logits: embeddings and rerank only, no warm-up decode
        self.encoder_only = bool(getattr(model.pipeline.arch, "ENCODER_ONLY", False))
        self._calls: queue.Queue[tuple[Callable[[Engine], object], concurrent.futures.Future]] = queue.Queue()

    # -- API for handlers (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamarpc-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, task: Task) -> None:
        if self._stopping:
            self._emit(task, ErrorEvent(task.index, 503, "the server is shutting down", "unavailable_error"))
            return
        self._inbox.put(task)

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between two steps (the nodes and KV cells are its own
        there: embeddings, rerank); the future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, fut))
        self._inbox.put(None)   # wake the loop
        return fut

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def cancel(self, task: Task) -> None:
        task.cancel()
        self._inbox.put(None)   # wake the loop

    def stream(self, prompt: Sequence[int], params: TaskParams) -> Iterator[Event]:
        """Submit one task and yield its events on the calling thread, up to its final or error
        event (the one-shot CLI, scripts, tests; the HTTP handlers use `submit` with their own
        sink). Leaving the loop early cancels the task."""
        if self._thread is None:
            raise RuntimeError("the engine is not started")
        events: queue.Queue[Event] = queue.Queue()
        task = Task(list(prompt), params, events.put)
        self.submit(task)
        done = False
        try:
            while not done:
                ev = events.get()
                done = isinstance(ev, (FinalEvent, ErrorEvent))
                yield ev
        finally:
            if not done:
                self.cancel(task)

    @property
    def n_deferred(self) -> int:
        return len(self._pending) + self._inbox.qsize()

    @property
    def n_processing(self) -> int:
        return sum(s.busy for s in self.slots)

    def node_states(self) -> list[dict[str, object]]:
        """Each node's name, state (attached, lost, removed) and layers, for /health and /metrics."""
        return self.model.pipeline.nodes()

    def dry_breakers(self, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
        key = tuple(breakers)
        with self._lock:
            hit = self._dry_cache.get(key)
        if hit is None:
            hit = dry_breakers(self.tokenizer, key)
            with self._lock:
                self._dry_cache[key] = hit
        return hit

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.config.warmup and not self.encoder_only:
            try:
                self._warmup()
            except BackendError as e:
                self.health_error = str(e)
                log.warning("warm-up failed: %s", e)
        while not self._stopping:
            try:
                self._intake(block=self.recovery.active or not any(s.busy for s in self.slots))
                if self._stopping:
                    break
                self._drop_cancelled()
                self.forks.check(self.slots)
                self._run_calls()
                if self.health_error is not None:
                    self._recover()
                self._assign()
                if any(s.busy for s in self.slots) and not self.recovery.active:
                    self._step()
            except Exception:  # noqa: BLE001 - the loop must survive anything a request causes
                log.exception("engine step failed")
                self._fail_all(500, "internal error in the engine", "server_error")
        self._fail_all(503, "the server is shutting down", "unavailable_error")
        self._intake(block=False)       # queued tasks end too, not only those in slots
        while self._pending:
            task = self._pending.popleft()
            self._emit(task, ErrorEvent(task.index, 503, "the server is shutting down", "unavailable_error"))

    def _intake(self, block: bool) -> None:
        try:
            if block and (not self._pending or self.recovery.active):
                item = self._inbox.get(timeout=0.25 if self.health_error else 1.0)
                if item is not None:
                    self._pending.append(item)
            while True:
                item = self._inbox.get_nowait()
                if item is not None:
                    self._pending.append(item)
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        if any(t.cancelled for t in self._pending):
            self._pending = collections.deque(t for t in self._pending if not t.cancelled)
        for s in self.slots:
            if s.busy and s.task is not None and s.task.cancelled:
                log.info("slot %d: task %d cancelled (client gone or timed out)", s.id, s.task.id)
                s.release()

    @staticmethod
    def _emit(task: Task, event: Event) -> None:
        try:
            task.sink(event)
        except Exception:  # noqa: BLE001 - a handler that went away must not stop the engine
            log.debug("task %d: event dropped", task.id, exc_info=True)

    def _fail_all(self, code: int, message: str, kind: str) -> None:
        for s in self.slots:
            if s.busy and s.task is not None:
                self._emit(s.task, ErrorEvent(s.task.index, code, message, kind))
                s.release()

    # -- scheduling -------------------------------------------------------------------------------
    def _assign(self) -> None:
        while self._pending:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            task = self._pending[0]
            if self.recovery.active:
                return      # held until the streams continue (or end)
            if self.health_error is not None:
                self._recover(force=True)
                if self.health_error is not None:
                    self._pending.popleft()
                    self._emit(task, ErrorEvent(task.index, 503, self.health_error, "unavailable_error"))
                    continue
            if self.encoder_only:
                self._pending.popleft()
                self._emit(task, ErrorEvent(task.index, 501, f"{self.model.args.arch} is an encoder: it serves "
                                            "embeddings and rerank, not completions", "not_supported_error"))
                continue
            group = self.forks.group(task, self._pending)
            if group is None or len(group) > len(free):
                return      # n > 1: all its choices start together, each in a slot of its own
            slot = self._pick_slot(task, free)
            if slot is None:
                return
            others = sorted((s for s in free if s is not slot), key=lambda s: s.last_used)
            for t, sl in zip(group, [slot, *others]):
                self._pending.remove(t)
                try:
                    self._launch(sl, t)
                    if t is not task:
                        self.forks.park(sl, task, self.kv)
                except ValueError as e:
                    sl.release()
                    self._emit(t, ErrorEvent(t.index, 400, str(e), "invalid_request_error"))
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    log.exception("task %d could not start", t.id)
                    sl.release()
                    self._emit(t, ErrorEvent(t.index, 500, f"{type(e).__name__}: {e}", "server_error"))

    def _pick_slot(self, task: Task, free: list[Slot]) -> Slot | None:
        want = task.params.id_slot
        if want >= 0:
            return next((s for s in free if s.id == want), None)
        if task.params.cache_prompt and task.prompt:
            lora = self.lora_scales(task.params)
            best = max(free, key=lambda s: common_prefix(s.cache, task.prompt) if s.lora == lora else 0)
            lcp = common_prefix(best.cache, task.prompt) if best.lora == lora else 0
            if lcp and lcp / len(task.prompt) > self.config.slot_prompt_similarity:
                return best
        return min(free, key=lambda s: s.last_used)

    def _launch(self, slot: Slot, task: Task) -> None:
        p = task.params
        n = len(task.prompt)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.n_ctx_slot:
            raise ValueError(f"the prompt has {n} tokens, the slot context is {self.n_ctx_slot}")
        lora = self.lora_scales(p)
        if len(lora) != len(self.model.adapters):
            raise ValueError(f"{len(lora)} LoRA scales for {len(self.model.adapters)} adapters")
        if slot.lora != lora:       # K/V computed with other adapter scales are not this request's
            slot.cache = []
        n_cached = min(common_prefix(slot.cache, task.prompt), n - 1) if p.cache_prompt else 0
        self.kv.remove(slot.id, n_cached)
        sp = p.sampling
        if p.ignore_eos:
            sp = dataclasses.replace(sp, logit_bias=sp.logit_bias + tuple(
                (t, float("-inf")) for t in sorted(self.tokenizer.eog_ids)))
        breakers = self.dry_breakers(sp.dry_sequence_breakers) if sp.dry_multiplier != 0.0 else {}
        sampler = Sampler(sp, self.model.n_vocab, n_ctx=self.n_ctx, dry_breakers=breakers)
        sampler.accept_many(task.prompt)
        slot.start(task, n_cached, sampler, self.tokenizer)
        slot.lora = lora
        self.metrics.n_requests_total += 1
        log.debug("slot %d: task %d, %d prompt tokens (%d cached)", slot.id, task.id, n, n_cached)

    # -- one step ---------------------------------------------------------------------------------
    def _step(self) -> None:
        busy = [s for s in self.slots if s.busy and not self.forks.waiting(s)]
        for s in busy:
            if s.context_shift and s.state == SlotState.GENERATING and len(s.todo) == 1 and len(s.cache) >= s.n_ctx:
                shift_slot(self.kv, s, self.shifter, self.tokenizer.add_bos)
        dec = [s for s in busy if s.state == SlotState.GENERATING and len(s.todo) == 1]
        pre = sorted((s for s in busy if s not in dec),
                     key=lambda s: s.task.t_arrival if s.task is not None else 0.0)
        replay = self.recovery.parts(busy, self.config.n_batch)
        parts = replay or step_plan.schedule(dec, pre, self.budget.prompt_tokens(len(dec)))
        if not parts:
            return
        drafts = self.spec.drafts(dec) if self.spec is not None and replay is None else {}
        plan = step_plan.build(parts, drafts, len(dec), replay is not None, bool(self.model.adapters))
        n_prompt = plan.n_prompt
        t0 = time.perf_counter()
        try:
            logits = self._forward(plan.tokens, plan.pos, plan.seq, plan.want, plan.lora)
        except NodeUnavailable as e:
            for s, _, _ in parts:
                self.kv.remove(s.id, len(s.cache))
            if e.node is None:
                log.warning("%s: recomputing every sequence", e)
                self._rewind_all()
            else:
                self._node_lost(str(e))
            return
        except BackendError as e:
            for s, _, _ in parts:
                self.kv.remove(s.id, len(s.cache))
            log.error("step failed: %s", e)
            self._fail_all(500, f"compute failed: {e}", "server_error")
            return
        dt = time.perf_counter() - t0
        if replay is None and not drafts:     # a step with drafts is not a decode step's time
            self.budget.observe(len(dec), n_prompt, dt)
        if self.on_step is not None:
            self.on_step(plan.kind, dt)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step: %d decode + %d prompt tokens in %.1f ms (kv view %d cells)", len(dec), n_prompt,
                      1e3 * dt, self.kv.used_len())
        m = self.metrics
        m.n_decode_total += 1
        m.n_busy_slots_total += len(busy)
        row = 0
        for s, take, out in parts:
            if s.id in drafts:
                d = drafts[s.id]
                events, final, n_acc = self.spec.verify(s, d, logits[row:row + 1 + len(d)], self.tokenizer, self.kv)
                row += 1 + len(d)
                m.n_draft_total += len(d)
                m.n_draft_accepted_total += n_acc
                m.n_tokens_max = max(m.n_tokens_max, len(s.cache))
                for ev in events:
                    self._emit(s.task, ev)
                if final is not None:
                    self._finish(s, final)
                continue
            s.cache += s.todo[:take]
            s.todo = s.todo[take:]
            m.n_tokens_max = max(m.n_tokens_max, len(s.cache))
            task = s.task
            assert task is not None
            kids: list[Slot] = []
            if s.state == SlotState.PROMPT and not s.todo:
                s.prompt_done()
                m.n_prompt_tokens_processed_total += len(task.prompt) - s.n_cached
                m.t_prompt_processing_total += s.t_prompt_done - s.t_start
                kids = self.forks.prompt_done(s, self.slots, self.kv, self.model.pipeline)
                if not s.wants_logits:
                    for k in (s, *kids):
                        self._finish(k, k.final("limit"))
                    continue
            if not out:
                continue
            for k in (s, *kids):    # the choices of one prompt sample the same row, each its own way
                events, final = k.on_logits(logits[row], self.tokenizer)   # the sampler copies the row
                for ev in events:
                    self._emit(k.task, ev)
                if final is not None:
                    self._finish(k, final)
            row += 1

    def _finish(self, s: Slot, final: Event) -> None:
        task = s.task
        assert task is not None
        m = self.metrics
        m.n_tokens_predicted_total += s.n_decoded
        if s.t_last and s.t_prompt_done:
            m.t_tokens_generation_total += s.t_last - s.t_prompt_done
        self._emit(task, final)
        s.release()

    def _forward(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, want: np.ndarray,
                 lora: np.ndarray | None = None) -> np.ndarray:
        return forward_micro_batches(self.model.pipeline, self.kv, tokens, pos, seq, want, self.config.n_ubatch,
                                     lora)

    def lora_scales(self, params: TaskParams) -> tuple[float, ...]:
        """A request's scale per LoRA adapter: its own, else the global ones (POST /lora-adapters)."""
        if params.lora is not None:
            return params.lora
        return tuple(a.scale for a in self.model.adapters)

    def _warmup(self) -> None:
        """A prefill, a decode and a mixed step, twice (budget.warm_up), from an empty cache."""
        if self.budget.warm_up(self._forward, self._reset_cache, self.model.n_vocab, self.n_ctx, self.config.n_ubatch):
            log.info("warm-up done: decode step %.1f ms, %.2f ms per prompt token next to a decode",
                     1e3 * (self.budget.decode_time(1) or 0.0), 1e3 * (self.budget.prompt_tok_s or 0.0))

