"""n > 1 on the engine (synthetic model): the prompt's KV cells copied to the other sequences by
CopyTensor give the same next-token logits as a fresh prefill; n choices from one prompt (greedy:
all equal to n=1; seeded: different and reproducible); groups queue for free slots; a cancelled
leader leaves its children to prefill themselves."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, ErrorEvent, FinalEvent, PartialEvent, TaskParams, load_model
from llamarpc.frontend.engine.fork import choice_params, choice_tasks, copy_cells, runs, seq_cells
from llamarpc.frontend.engine.forward import forward_micro_batches
from llamarpc.frontend.engine.kv_cells import KVCells
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.proto.errors import NodeUnavailable
from llamarpc.proto.types import GGMLType
from synth import write_model
from test_engine import FlakyBackend

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [5, 17, 99, 3, 250, 42, 7, 11, 130, 64, 8, 200]


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nchoices") / "m.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    return path


def _step(model, kv: KVCells, toks, seq: int, p0: int) -> np.ndarray:
    toks = np.asarray(toks, np.int32)
    pos = np.arange(p0, p0 + toks.size, dtype=np.int32)
    want = np.zeros(toks.size, bool)
    want[-1] = True
    return forward_micro_batches(model.pipeline, kv, toks, pos, np.full(toks.size, seq, np.int32), want, 512)[-1]


def test_runs():
    assert runs(np.array([0, 1, 2, 5, 6]), np.array([10, 11, 12, 13, 20])) == [(0, 10, 3), (5, 13, 1), (6, 20, 1)]
    assert runs(np.array([], np.int32), np.array([], np.int32)) == []


@pytest.mark.parametrize("kv_type", [GGMLType.F32, GGMLType.F16])
def test_copied_cells_give_the_fresh_prefill_logits(synth_path, kv_type):
    model = load_model(str(synth_path), [LocalBackend()], n_ctx=128, kv_type=kv_type)
    try:
        n, nxt = len(PROMPT), 77
        # fresh: the prompt prefilled in sequence 2, then one more token
        kv = KVCells(model.n_ctx)
        _step(model, kv, PROMPT, 2, 0)
        fresh = _step(model, kv, [nxt], 2, n)
        # copied: prefilled in sequence 0 (after another sequence's cells, dropped next, so the
        # copy lands in two runs), cells copied to sequence 1, then the same token on sequence 1
        # (its cell after the copied ones, as the fresh one's: attention sums in cell order)
        model.pipeline.clear_kv()
        kv = KVCells(model.n_ctx)
        _step(model, kv, [9, 9, 9], 4, 0)
        _step(model, kv, PROMPT, 0, 0)
        kv.remove(4)
        src = seq_cells(kv, 0, n)
        dst = kv.alloc(np.full(n, 1, np.int32), np.arange(n, dtype=np.int32))
        assert not np.array_equal(src, dst) and len(runs(src, dst)) > 1   # moved, and in several runs
        copies = copy_cells(model.pipeline, src, dst)
        assert copies == 2 * model.args.n_layer * len(runs(src, dst))
        st = model.pipeline.stages[0]
        k_ref = st.kv_refs[0][0]
        dtype = np.float32 if kv_type == GGMLType.F32 else np.float16
        row = k_ref.shape[1] * np.dtype(dtype).itemsize
        k0 = st.backend.get_tensor(k_ref.buffer_id, k_ref.offset, model.n_ctx * row)
        rows = np.frombuffer(k0, dtype).reshape(model.n_ctx, -1)
        assert np.array_equal(rows[src], rows[dst])
        copied = _step(model, kv, [nxt], 1, n)
        assert np.array_equal(copied, fresh)
        # without the copy the sequence would see nothing: the logits differ (the test can fail)
        kv.remove(1)
        kv.remove(0)
        kv.alloc(np.full(n, 1, np.int32), np.arange(n, dtype=np.int32))     # stale cells, not the prompt
        assert not np.array_equal(_step(model, kv, [nxt], 1, n), fresh)
    finally:
        model.close()


@pytest.fixture(scope="module")
def engine(synth_path):
    model = load_model(str(synth_path), [LocalBackend()], n_ctx=512)
    eng = Engine(model, EngineConfig(n_parallel=4))
    eng.start()
    yield eng
    eng.stop()
    model.close()


class Group:
    def __init__(self, engine: Engine, n: int, base: int = 0, **kw) -> None:
        kw.setdefault("sampling", GREEDY)
        self.events: list = []
        self.done = threading.Event()
        self.n = n
        self.tasks = choice_tasks(list(PROMPT), TaskParams(**kw), n, self._sink, base)
        for t in self.tasks:
            engine.submit(t)

    def _sink(self, e) -> None:
        self.events.append(e)
        if sum(isinstance(x, (FinalEvent, ErrorEvent)) for x in self.events) == self.n:
            self.done.set()

    def finals(self, timeout: float = 60.0) -> dict[int, FinalEvent]:
        assert self.done.wait(timeout), "the choices did not finish"
        errors = [e for e in self.events if isinstance(e, ErrorEvent)]
        assert not errors, errors
        return {e.index: e for e in self.events if isinstance(e, FinalEvent)}

    def streamed(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for e in self.events:
            if isinstance(e, PartialEvent):
                out.setdefault(e.index, []).extend(e.tokens)
        return out


def test_greedy_choices_equal_the_single_reply(engine):
    one = Group(engine, 1, n_predict=10, ignore_eos=True, cache_prompt=False).finals()[0]
    copies = engine.forks.n_copies
    g = Group(engine, 3, n_predict=10, ignore_eos=True, cache_prompt=False)
    finals = g.finals()
    assert sorted(finals) == [0, 1, 2]
    assert all(f.tokens == one.tokens for f in finals.values())
    assert g.streamed() == {i: one.tokens for i in range(3)}
    assert len({f.id_slot for f in finals.values()}) == 3
    assert engine.forks.n_copies > copies        # the prompt was copied, not computed three times


def test_seeded_choices_differ_and_repeat(engine):
    kw = dict(n_predict=12, ignore_eos=True, sampling=SamplingParams(temperature=1.5, top_k=0, top_p=1.0,
                                                                       min_p=0.0, seed=1234))
    a = {i: f.tokens for i, f in Group(engine, 3, **kw).finals().items()}
    b = {i: f.tokens for i, f in Group(engine, 3, **kw).finals().items()}
    assert a == b
    assert len({tuple(t) for t in a.values()}) > 1
    # choice 0 is the n=1 reply with that seed
    assert Group(engine, 1, **kw).finals()[0].tokens == a[0]


def test_choice_seeds():
    p = TaskParams(sampling=SamplingParams(seed=7))
    assert [choice_params(p, j).sampling.seed for j in range(3)] == [7, 8, 9]
    q = TaskParams(sampling=SamplingParams(seed=-1))
    assert choice_params(q, 2) is q


def test_groups_queue_for_free_slots(engine):
    ref = Group(engine, 1, n_predict=6, ignore_eos=True).finals()[0].tokens
    g1 = Group(engine, 3, n_predict=6, ignore_eos=True)
    g2 = Group(engine, 3, base=3, n_predict=6, ignore_eos=True)      # 6 choices on 4 slots: one group waits
    f1, f2 = g1.finals(), g2.finals()
    assert sorted(f1) == [0, 1, 2] and sorted(f2) == [3, 4, 5]
    assert all(f.tokens == ref for f in [*f1.values(), *f2.values()])


def test_cancelled_leader_leaves_the_children_running(engine):
    ref = Group(engine, 1, n_predict=6, ignore_eos=True).finals()[0].tokens
    done = threading.Event()
    events: list = []

    def sink(e):
        events.append(e)
        if sum(isinstance(x, (FinalEvent, ErrorEvent)) for x in events) == 2:
            done.set()

    tasks = choice_tasks(list(PROMPT), TaskParams(sampling=GREEDY, n_predict=6, ignore_eos=True), 3, sink)
    tasks[0].cancel()
    for t in tasks:
        engine.submit(t)
    assert done.wait(60)
    finals = {e.index: e for e in events if isinstance(e, FinalEvent)}
    assert sorted(finals) == [1, 2] and all(f.tokens == ref for f in finals.values())


class CopyFails(LocalBackend):
    """A node whose CopyTensor fails like a lost node once, then answers again."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def copy_tensor(self, *a) -> None:
        if self.fail:
            self.fail = False
            raise NodeUnavailable("connection reset", node=self.name)
        super().copy_tensor(*a)


def _engine(path, backends, **cfg) -> Engine:
    eng = Engine(load_model(str(path), backends, n_ctx=512), EngineConfig(n_parallel=4, **cfg))
    eng.start()
    return eng


def test_failed_copy_makes_the_children_prefill(synth_path, engine):
    ref = Group(engine, 1, n_predict=6, ignore_eos=True).finals()[0].tokens
    eng = _engine(synth_path, [CopyFails()])
    try:
        finals = Group(eng, 3, n_predict=6, ignore_eos=True).finals()
        assert sorted(finals) == [0, 1, 2] and all(f.tokens == ref for f in finals.values())
        assert eng.forks.n_copies == 2 * eng.model.args.n_layer     # the second child's copy went through
    finally:
        eng.stop()
        eng.model.close()


def test_node_restart_mid_stream_all_choices_continue(synth_path, engine):
    ref = Group(engine, 1, n_predict=30, ignore_eos=True).finals()[0].tokens
    flaky = FlakyBackend()
    eng = _engine(synth_path, [LocalBackend(), flaky])
    try:
        g = Group(eng, 3, n_predict=30, ignore_eos=True)
        while sum(isinstance(e, PartialEvent) for e in g.events) < 6:
            time.sleep(0.002)
        flaky.restarted = True
        finals = g.finals()
        assert all(f.tokens == ref for f in finals.values()) and eng.model.pipeline.epoch == 1
        assert g.streamed() == {i: ref for i in range(3)}
    finally:
        eng.stop()
        eng.model.close()


def test_node_gone_ends_every_choice(synth_path):
    flaky = FlakyBackend()
    eng = _engine(synth_path, [flaky], node_grace=0.0, recover_interval=0.05)
    try:
        g = Group(eng, 3, n_predict=200, ignore_eos=True)
        while sum(isinstance(e, PartialEvent) for e in g.events) < 3:
            time.sleep(0.002)
        flaky.down = True
        assert g.done.wait(30), "the choices did not end"
        errors = {e.index: e.code for e in g.events if isinstance(e, ErrorEvent)}
        assert errors == {0: 503, 1: 503, 2: 503}
        deadline = time.monotonic() + 10
        while any(s.busy for s in eng.slots) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(s.busy for s in eng.slots) and not eng.forks._waiting
    finally:
        flaky.down = False
        eng.stop()
        eng.model.close()


def test_choices_over_two_grpc_nodes(synth_path, engine, tmp_path):
    """The copy over the wire: CopyTensor on each of two llamarpc-server processes."""
    from llamarpc.client.remote import RemoteBackend
    from nodeproc import start_node

    ref = Group(engine, 1, n_predict=8, ignore_eos=True).finals()[0].tokens
    nodes = [start_node(tmp_path), start_node(tmp_path)]
    eng = None
    try:
        eng = _engine(synth_path, [RemoteBackend(n.address) for n in nodes])
        finals = Group(eng, 3, n_predict=8, ignore_eos=True).finals()
        assert sorted(finals) == [0, 1, 2] and all(f.tokens == ref for f in finals.values())
        assert eng.forks.n_copies == 2 * 2 * eng.model.args.n_layer      # two children, every layer's K and V
    finally:
        if eng is not None:
            eng.stop()
            eng.model.close()
        for n in nodes:
            n.stop()


def test_children_report_the_leaders_prompt_timings(engine):
    finals = Group(engine, 3, n_predict=4, ignore_eos=True, cache_prompt=False).finals()
    t0 = finals[0].timings
    assert t0.prompt_n == len(PROMPT)
    assert all((f.timings.prompt_n, f.timings.prompt_ms, f.timings.cache_n) == (t0.prompt_n, t0.prompt_ms, t0.cache_n)
               for f in finals.values())


def test_prompt_probs_in_bounded_forwards(engine, monkeypatch):
    from llamarpc.frontend.engine import prompt_probs
    from llamarpc.frontend.sampling import softmax_prob

    prompt = PROMPT * 3
    whole = engine.call(lambda e: prompt_probs.prompt_token_probs(e, prompt, 3)).result(30)
    monkeypatch.setattr(prompt_probs, "LOGITS_BYTES", 5 * 4 * engine.model.n_vocab)     # 5 rows a forward
    cut = engine.call(lambda e: prompt_probs.prompt_token_probs(e, prompt, 3)).result(30)
    assert whole[0] is None and cut[0] is None and len(whole) == len(cut) == len(prompt)
    assert [o.id for o in whole[1:]] == prompt[1:] == [o.id for o in cut[1:]]
    assert np.allclose([o.prob for o in whole[1:]], [o.prob for o in cut[1:]], atol=1e-5)
    assert all(len(o.top) == 3 for o in cut[1:])
    # token i's probability is the model's after tokens 0..i-1 (a fresh forward of that prefix)
    seq = len(engine.slots) + 1

    def prefix_prob(e: Engine) -> float:
        try:
            return softmax_prob(_step(e.model, e.kv, prompt[:7], seq, 0), prompt[7])
        finally:
            e.kv.remove(seq)
    assert engine.call(prefix_prob).result(30) == pytest.approx(whole[7].prob, abs=1e-5)
    assert not np.any(engine.kv.seq == len(engine.slots))       # the probe's cells were freed
