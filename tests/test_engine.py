"""The engine on a tiny synthetic model: continuous batching equals one-at-a-time, prompt caching,
queueing, cancellation, chunked prefill next to decoding, stop strings, and nodes lost and found."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, ErrorEvent, FinalEvent, PartialEvent, Task, TaskParams, load_model
from llamarpc.frontend.engine.text import OutputText, find_partial_stop
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.proto.errors import NodeUnavailable
from synth import write_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "m.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=1)
    return path


class Run:
    """Submit tasks and wait for their final events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events: dict[int, list] = {}
        self.done: dict[int, threading.Event] = {}

    def submit(self, prompt: list[int], **kw) -> Task:
        kw.setdefault("sampling", GREEDY)
        evs: list = []
        done = threading.Event()

        def sink(e):
            evs.append(e)
            if isinstance(e, (FinalEvent, ErrorEvent)):
                done.set()

        t = Task(list(prompt), TaskParams(**kw), sink)
        self.events[t.id], self.done[t.id] = evs, done
        self.engine.submit(t)
        return t

    def final(self, t: Task, timeout: float = 30.0):
        assert self.done[t.id].wait(timeout), "task did not finish"
        return self.events[t.id][-1]


def make_engine(path, n_ctx=512, backends=None, **cfg) -> Engine:
    model = load_model(str(path), backends or [LocalBackend()], n_ctx=n_ctx)
    eng = Engine(model, EngineConfig(**cfg))
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engine(synth_path):
    eng = make_engine(synth_path, n_parallel=4)
    yield eng
    eng.stop()
    eng.model.close()


def prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(3, 259, size=int(rng.integers(5, 40))).tolist() for _ in range(n)]


def test_batched_requests_equal_one_at_a_time(engine):
    run = Run(engine)
    ps = prompts(6)   # more than the 4 slots: two wait in the queue
    alone = [run.final(run.submit(p, n_predict=12, ignore_eos=True, cache_prompt=False)).tokens for p in ps]
    tasks = [run.submit(p, n_predict=12, ignore_eos=True, cache_prompt=False) for p in ps]
    together = [run.final(t).tokens for t in tasks]
    assert together == alone
    assert all(len(t) == 12 for t in alone)


def test_events_stream_then_final(engine):
    run = Run(engine)
    t = run.submit(prompts(1)[0], n_predict=5, ignore_eos=True)
    f = run.final(t)
    parts = [e for e in run.events[t.id] if isinstance(e, PartialEvent)]
    assert [tok for e in parts for tok in e.tokens] == f.tokens
    assert "".join(e.text for e in parts) == f.content
    assert f.stop_type == "limit" and f.n_decoded == 5 and f.timings.predicted_n == 5


def test_prompt_prefix_is_reused(engine):
    run = Run(engine)
    p = prompts(1)[0] + list(range(40, 70))
    a = run.final(run.submit(p, n_predict=6, ignore_eos=True))
    b = run.final(run.submit(p[:-3] + [9, 9, 9], n_predict=6, ignore_eos=True))
    c = run.final(run.submit(p[:-3] + [9, 9, 9], n_predict=6, ignore_eos=True, cache_prompt=False))
    assert b.timings.cache_n >= len(p) - 3 and c.timings.cache_n == 0
    assert b.tokens == c.tokens and a.timings.prompt_n == len(p) - a.timings.cache_n


def test_n_predict_zero_evaluates_the_prompt_only(engine):
    run = Run(engine)
    f = run.final(run.submit(prompts(1)[0], n_predict=0))
    assert f.tokens == [] and f.n_decoded == 0 and f.timings.prompt_n > 0


def test_context_end_stops_with_truncated(synth_path):
    eng = make_engine(synth_path, n_ctx=64, n_parallel=2, warmup=False)   # 32 tokens a slot
    try:
        run = Run(eng)
        f = run.final(run.submit(list(range(3, 23)), n_predict=-1, ignore_eos=True))
        assert f.stop_type == "limit" and f.truncated and f.n_decoded == 32 - 20 + 1
        err = run.final(run.submit(list(range(3, 40))))
        assert isinstance(err, ErrorEvent) and err.code == 400
    finally:
        eng.stop()
        eng.model.close()


def test_cancel_frees_the_slot_within_a_step(engine):
    run = Run(engine)
    t = run.submit(prompts(1)[0], n_predict=400, ignore_eos=True)
    while not any(isinstance(e, PartialEvent) for e in run.events[t.id]):
        time.sleep(0.005)
    steps = engine.metrics.n_decode_total
    engine.cancel(t)
    deadline = time.time() + 5
    while any(s.busy for s in engine.slots) and time.time() < deadline:
        time.sleep(0.002)
    assert not any(s.busy for s in engine.slots)
    assert engine.metrics.n_decode_total - steps <= 2
    assert not any(isinstance(e, FinalEvent) for e in run.events[t.id])


def test_stream_yields_one_tasks_events_and_leaving_it_cancels(engine):
    params = TaskParams(sampling=GREEDY, n_predict=5, ignore_eos=True)
    events = list(engine.stream(prompts(1)[0], params))
    assert isinstance(events[-1], FinalEvent) and all(isinstance(e, PartialEvent) for e in events[:-1])
    assert [t for e in events[:-1] for t in e.tokens] == events[-1].tokens and len(events[-1].tokens) == 5
    it = engine.stream(prompts(1)[0], TaskParams(sampling=GREEDY, n_predict=400, ignore_eos=True))
    assert isinstance(next(it), PartialEvent)
    it.close()
    deadline = time.time() + 5
    while any(s.busy for s in engine.slots) and time.time() < deadline:
        time.sleep(0.002)
    assert not any(s.busy for s in engine.slots)


def test_long_prompt_is_chunked_next_to_decoding_streams(synth_path, monkeypatch):
    eng = make_engine(synth_path, n_ctx=1024, n_parallel=4, prefill_chunk=16, warmup=False)
    try:
        sizes: list[tuple[int, int]] = []   # (tokens in the forward, of which decode tokens)
        orig = eng.model.pipeline.forward

        def spy(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows):
            sizes.append((len(tokens), len(out_rows)))
            return orig(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows)

        monkeypatch.setattr(eng.model.pipeline, "forward", spy)
        run = Run(eng)
        streams = [run.submit(p, n_predict=60, ignore_eos=True) for p in prompts(2)]
        while sum(isinstance(e, PartialEvent) for t in streams for e in run.events[t.id]) < 4:
            time.sleep(0.002)
        mark = len(sizes)
        long = run.submit(list(np.arange(200) % 250 + 3), n_predict=3, ignore_eos=True)
        for t in streams + [long]:
            assert isinstance(run.final(t), FinalEvent)
        after = sizes[mark:]
        chunks = [(n, outs) for n, outs in after if n > 3]
        assert len(chunks) >= 200 // 16                          # the prompt went in chunks ...
        assert all(n <= 2 + 16 and outs >= 2 for n, outs in chunks[:-1])   # ... each beside both streams' tokens
    finally:
        eng.stop()
        eng.model.close()


def test_stop_strings_are_held_back_and_never_sent(synth_path):
    from llamarpc.frontend.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(str(synth_path))
    out = OutputText(tok, stop=["STOP"])
    sent = "".join(out.push(t) for t in tok.encode("abc ST", add_special=False))
    assert sent == "abc " and not out.stopped                # "ST" could start "STOP"
    sent += "".join(out.push(t) for t in tok.encode("Xyz", add_special=False))
    assert sent == "abc STXyz"                              # it did not
    sent += "".join(out.push(t) for t in tok.encode(" STOP and more", add_special=False))
    assert out.stopped and out.stopping_word == "STOP" and sent == "abc STXyz " and out.text == "abc STXyz "
    assert find_partial_stop("hello", "say hel") == 4 and find_partial_stop("hello", "say") == -1


def test_utf8_is_held_until_complete(synth_path):
    from llamarpc.frontend.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(str(synth_path))
    out = OutputText(tok)
    ids = tok.encode("é!", add_special=False)              # byte tokens: 0xC3 0xA9 '!'
    assert [out.push(t) for t in ids] == ["", "é", "!"]


class FlakyBackend(LocalBackend):
    """An in-process node that can be 'unplugged': while down, every call fails like a lost node."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "flaky:1"
        self.down = False
        self.restarted = False     # the node restarted: its session (and KV cache) is gone

    @property
    def alive(self) -> bool:
        return not self.down and not self.restarted

    def _check(self) -> None:
        if self.down:
            raise NodeUnavailable("connection refused", node=self.name)

    def compute(self, graph_id, inputs):
        self._check()
        return super().compute(graph_id, inputs)

    def reconnect(self):
        self._check()
        self.restarted = False
        return self.hello()


def test_node_restarted_between_steps_sequences_are_recomputed(synth_path):
    flaky = FlakyBackend()
    eng = make_engine(synth_path, backends=[LocalBackend(), flaky], n_parallel=2)
    ref = make_engine(synth_path, n_parallel=1, warmup=False)
    try:
        run, rr = Run(eng), Run(ref)
        p = prompts(3)[2]
        t = run.submit(p, n_predict=40, ignore_eos=True)
        while sum(isinstance(e, PartialEvent) for e in run.events[t.id]) < 5:
            time.sleep(0.002)
        flaky.restarted = True
        f = run.final(t)
        assert isinstance(f, FinalEvent), f
        assert f.tokens == rr.final(rr.submit(p, n_predict=40, ignore_eos=True)).tokens
        assert eng.health_error is None and eng.model.pipeline.epoch == 1
    finally:
        for e in (eng, ref):
            e.stop()
            e.model.close()


def test_stop_ends_queued_tasks_too(synth_path):
    eng = make_engine(synth_path, n_ctx=4096, n_parallel=1)
    run = Run(eng)
    busy = run.submit([1, 2, 3], n_predict=4000, ignore_eos=True)      # seconds: the others stay queued
    queued = [run.submit([4, 5, 6], n_predict=4) for _ in range(3)]
    time.sleep(0.2)
    eng.stop()
    for t in (busy, *queued):
        ev = run.final(t, timeout=10)
        assert isinstance(ev, (ErrorEvent, FinalEvent))
    assert all(isinstance(run.final(t), ErrorEvent) and run.final(t).code == 503 for t in queued)
    late = run.submit([7, 8])
    ev = run.final(late, timeout=5)
    assert isinstance(ev, ErrorEvent) and ev.code == 503
