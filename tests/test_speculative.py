"""Speculative decoding (frontend/engine/speculative.py): a draft model or n-gram lookup proposes
tokens, the target verifies them in one batched step. The output must be the plain run's token for
token (greedy, and seeded sampling), with rejections (a different draft), stop strings, n_predict
and n_probs inside an accepted run; acceptance counts in the timings and the engine's metrics."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, PartialEvent, TaskParams, load_model
from llamarpc.frontend.engine.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpecParams,
    Speculative,
    check_vocab,
    top_prob,
)
from llamarpc.frontend.sampling import SamplingParams
from synth import T, write_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target, other = d / "target.gguf", d / "draft.gguf"
    write_model(target, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=1)
    # the target's weights through Q4_0: a draft that agrees sometimes
    write_model(other, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=1, qtype=T.Q4_0)
    return target, other


@pytest.fixture(scope="module")
def target(paths):
    m = load_model(str(paths[0]), [LocalBackend()], n_ctx=512)
    yield m
    m.close()


def _draft_model(path, n_ctx=512):
    return load_model(str(path), [LocalBackend()], n_ctx=n_ctx)


def run(model, prompt, spec=None, n_parallel=1, **kw):
    """One task's events through an engine (speculative when `spec` is given)."""
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("n_predict", 40)
    kw.setdefault("cache_prompt", False)
    eng = Engine(model, EngineConfig(n_parallel=n_parallel, warmup=False), spec)
    eng.start()
    try:
        evs = list(eng.stream(prompt, TaskParams(**kw)))
    finally:
        eng.stop()
    assert isinstance(evs[-1], FinalEvent), evs[-1]
    return evs, eng


def tokens_of(evs):
    return [t for e in evs if isinstance(e, PartialEvent) for t in e.tokens]


PROMPT = list(b"Hello there, speculative world. ")
REPEAT = list(b"one two three four five six. " * 4)


def test_different_draft_rejects_but_output_is_plain(target, paths):
    plain, _ = run(target, PROMPT)
    draft = _draft_model(paths[1])
    drafter = ModelDrafter(draft, 1)
    spec = Speculative([drafter], SpecParams(n_max=6, p_min=0.0), target.n_vocab)
    try:
        evs, eng = run(target, PROMPT, spec)
    finally:
        spec.close()
    assert tokens_of(evs) == tokens_of(plain) == evs[-1].tokens
    # the rejected tokens' cells are gone: the cells are exactly the slot's cache, on both models
    cache = eng.slots[0].cache
    assert cache == PROMPT + evs[-1].tokens[:-1]
    assert eng.kv.n_used == eng.kv.seq_len(0) == len(cache)
    assert drafter.kv.n_used == drafter.kv.seq_len(0) == len(drafter.cache[0])
    t = evs[-1].timings
    assert 0 < t.draft_n_accepted < t.draft_n       # accepted runs and rejections
    assert (eng.metrics.n_draft_total, eng.metrics.n_draft_accepted_total) == (t.draft_n, t.draft_n_accepted)
    j = t.to_json()
    assert j["draft_n"] == t.draft_n and j["draft_n_accepted"] == t.draft_n_accepted
    assert "draft_n" not in plain[-1].timings.to_json()                # as llama-server: only when drafting


def test_two_slots_at_once(target, paths):
    """Two decoding slots drafting in the same steps (each its own draft sequence) and a third
    request's prompt next to them: each equals its plain run."""
    import queue

    from llamarpc.frontend.engine import Task

    prompts = [PROMPT, list(b"Another prompt, a different one: "), REPEAT]
    plain = [tokens_of(run(target, p, n_predict=20)[0]) for p in prompts]
    draft = _draft_model(paths[1])
    spec = Speculative([NgramDrafter(1, 8), ModelDrafter(draft, 2)], SpecParams(n_max=4, p_min=0.0), target.n_vocab)
    eng = Engine(target, EngineConfig(n_parallel=2, warmup=False), spec)
    eng.start()
    try:
        qs = [queue.Queue() for _ in prompts]
        for p, q in zip(prompts, qs, strict=True):
            eng.submit(Task(list(p), TaskParams(sampling=GREEDY, n_predict=20, cache_prompt=False), q.put))
        finals = []
        for q in qs:
            while not isinstance(ev := q.get(timeout=60), FinalEvent):
                pass
            finals.append(ev)
    finally:
        eng.stop()
        spec.close()
    assert [f.tokens for f in finals] == plain
    assert all(f.timings.draft_n > 0 for f in finals)


@pytest.fixture()
def self_spec(paths):
    """The target as its own draft (p_min 0): nearly every draft token is accepted."""
    draft = _draft_model(paths[0])
    spec = Speculative([ModelDrafter(draft, 2)], SpecParams(n_max=8, p_min=0.0), draft.n_vocab)
    yield spec
    spec.close()


def test_self_draft_accepts_runs_one_event_per_token(target, self_spec):
    plain, _ = run(target, PROMPT)
    evs, eng = run(target, PROMPT, self_spec, n_parallel=2)
    t = evs[-1].timings
    assert tokens_of(evs) == tokens_of(plain)
    assert t.draft_n_accepted >= 0.8 * t.draft_n > 0
    assert eng.metrics.n_decode_total < 40 // 2        # several tokens per step
    parts = [e for e in evs if isinstance(e, PartialEvent) and e.tokens]
    assert [len(e.tokens) for e in parts] == [1] * len(parts)
    assert [e.n_decoded for e in parts] == list(range(1, len(parts) + 1))


def test_stop_string_and_n_predict_inside_an_accepted_run(target, self_spec):
    plain, _ = run(target, PROMPT, n_predict=30)
    text = plain[-1].content
    stop = text[12:15]
    assert text.find(stop) >= 10        # the stop comes after the first draft run has started
    ref, _ = run(target, PROMPT, n_predict=30, stop=(stop,))
    evs, _ = run(target, PROMPT, self_spec, n_predict=30, stop=(stop,))
    f, r = evs[-1], ref[-1]
    assert (f.content, f.tokens, f.stop_type, f.stopping_word) == (r.content, r.tokens, "word", stop)
    assert "".join(e.text for e in evs if isinstance(e, PartialEvent)) == r.content
    assert f.timings.draft_n_accepted > 0
    for n in (1, 2, 9, 11):
        evs, _ = run(target, PROMPT, self_spec, n_predict=n)
        assert evs[-1].tokens == tokens_of(plain)[:n] and evs[-1].stop_type == "limit"


def test_seeded_sampling_and_probs_equal_plain(target, self_spec):
    kw = dict(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42), n_probs=3)
    plain, _ = run(target, PROMPT, **kw)
    evs, _ = run(target, PROMPT, self_spec, **kw)
    assert tokens_of(evs) == tokens_of(plain)
    assert evs[-1].timings.draft_n > 0
    pa = [(p.id, [q.id for q in p.top]) for p in evs[-1].probs]
    pb = [(p.id, [q.id for q in p.top]) for p in plain[-1].probs]
    assert pa == pb
    np.testing.assert_allclose([p.prob for p in evs[-1].probs], [p.prob for p in plain[-1].probs], rtol=1e-4)


def test_ngram_on_a_repetitive_prompt(target):
    plain, _ = run(target, REPEAT, n_predict=48)
    spec = Speculative([NgramDrafter(1, 16)], SpecParams(n_max=16), target.n_vocab)
    evs, _ = run(target, REPEAT, spec, n_predict=48)
    assert tokens_of(evs) == tokens_of(plain)
    assert 0 < evs[-1].timings.draft_n_accepted < evs[-1].timings.draft_n


def test_ngram_lookup():
    d = NgramDrafter(2, 3)
    assert d.lookup([1, 2, 3, 4, 5, 1, 2], 16) == [3, 4, 5]
    assert d.lookup([1, 2, 3, 9, 1, 2, 7, 1, 2], 16) == [7, 1, 2]     # the latest occurrence
    assert d.lookup([1, 2, 3, 4, 5, 1, 2], 2) == [3, 4]
    assert d.lookup([1, 2, 3, 4], 16) == []
    assert d.lookup([1, 2, 1, 2], 16) == [1, 2]


def test_top_prob_and_params():
    x = np.log(np.array([0.5, 0.3, 0.2]))
    assert top_prob(x) == pytest.approx(0.5)
    assert top_prob(np.r_[x, np.full(20, -1e9)]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        SpecParams(n_max=2, n_min=3).validate()
    with pytest.raises(ValueError):
        SpecParams(p_min=1.5).validate()


def test_vocab_check(target, paths):
    draft = _draft_model(paths[1])
    try:
        check_vocab(target.tokenizer, draft.tokenizer)      # same byte vocabulary: fine
        draft.tokenizer.tokens = list(draft.tokenizer.tokens)
        draft.tokenizer.tokens[10] = "<changed>"
        with pytest.raises(ValueError, match="token 10"):
            check_vocab(target.tokenizer, draft.tokenizer)
    finally:
        draft.close()


def test_cli_flags_build_the_drafters(target, paths):
    from llamarpc.frontend.cli.args import build_parser
    from llamarpc.frontend.cli.setup import speculative_from_args

    args = build_parser().parse_args(["-m", str(paths[0]), "-md", str(paths[1]), "--spec-type", "ngram-simple",
                                      "--draft-max", "5", "--draft-min", "1", "--draft-p-min", "0.5", "-ngld", "99",
                                      "-cd", "128", "--spec-ngram-size-n", "4"])
    spec = speculative_from_args(args, target, 2)
    try:
        assert [type(d) for d in spec.drafters] == [NgramDrafter, ModelDrafter]
        assert (spec.params.n_max, spec.params.n_min, spec.params.p_min) == (5, 1, 0.5)
        assert spec.drafters[0].n == 4 and spec.drafters[1].model.n_ctx == 128
    finally:
        spec.close()
    args = build_parser().parse_args(["-m", str(paths[0])])
    assert args.draft_max == 16 and args.draft_min == 0 and args.draft_p_min == 0.8 and args.spec_type == "none"
    assert speculative_from_args(args, target, 1) is None
    from llamarpc.frontend.cli.server import make_server
    from llamarpc.proto.cliargs import CLIError

    with pytest.raises(CLIError, match="--draft-min 5 is larger than --draft-max 2"):
        make_server(build_parser().parse_args(["-m", str(paths[0]), "--draft-min", "5", "--draft-max", "2"]))


@pytest.mark.slow
def test_smollm_as_its_own_draft_and_ngram(smollm, model_path):
    tok = smollm.tokenizer
    prompt = tok.encode("The capital of France is", add_special=True)
    plain, _ = run(smollm, prompt, n_predict=24)
    draft = load_model(str(model_path), [LocalBackend()], n_ctx=256)
    spec = Speculative([ModelDrafter(draft, 1)], SpecParams(n_max=8, p_min=0.0), smollm.n_vocab)
    try:
        evs, _ = run(smollm, prompt, spec, n_predict=24)
    finally:
        spec.close()
    assert evs[-1].tokens == plain[-1].tokens
    assert evs[-1].timings.draft_n_accepted > 0
    rep = tok.encode("red green blue yellow; " * 6, add_special=True)
    plain, _ = run(smollm, rep, n_predict=32)
    spec = Speculative([NgramDrafter(4, 16)], SpecParams(), smollm.n_vocab)
    evs, _ = run(smollm, rep, spec, n_predict=32)
    assert evs[-1].tokens == plain[-1].tokens
    assert evs[-1].timings.draft_n_accepted > 0


def test_server_draft_on_its_own_node(target, paths, tmp_path):
    """`llamarpc -m T -md D --rpc-draft NODE`: the draft's layers on a llamarpc-server node; /completion's
    tokens equal the plain engine's, streamed one token per event, with draft_n in the timings,
    the counters in /metrics and /slots saying speculative."""
    import httpx
    from nodeproc import start_node
    from serverproc import start_server

    plain, _ = run(target, PROMPT, n_predict=24)
    with start_node(tmp_path) as node:
        srv, url = start_server(["-m", str(paths[0]), "-c", "512", "-np", "2", "-md", str(paths[1]), "--rpc-draft",
                                 node.address, "--draft-p-min", "0", "--draft-max", "6", "--metrics", "--slots",
                                 "-t", "1"])
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                body = {"prompt": PROMPT, "n_predict": 24, "temperature": 0, "return_tokens": True,
                        "cache_prompt": False}
                r = c.post("/completion", json=body)
                assert r.status_code == 200, r.text
                j = r.json()
                assert j["tokens"] == plain[-1].tokens
                assert 0 < j["timings"]["draft_n_accepted"] < j["timings"]["draft_n"]
                with c.stream("POST", "/completion", json={**body, "stream": True}) as s:
                    chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
                toks = [t for ch in chunks if not ch.get("stop") for t in ch["tokens"]]
                assert toks == plain[-1].tokens        # one event per token (a held-back tail may carry none)
                assert {len(ch["tokens"]) for ch in chunks if not ch.get("stop")} <= {0, 1}
                assert "draft_n" in chunks[-1]["timings"]
                m = c.get("/metrics").text
                drafted = float(re.search(r"^llamacpp:tokens_drafted_total (\S+)$", m, re.M).group(1))
                accepted = float(re.search(r"^llamacpp:tokens_drafted_accepted_total (\S+)$", m, re.M).group(1))
                assert drafted >= 2 * j["timings"]["draft_n"] - 6 and 0 < accepted < drafted
                assert all(s["speculative"] for s in c.get("/slots").json())
                props = c.get("/props").json()["default_generation_settings"]
                assert props["speculative"] and props["params"]["speculative.n_max"] == 6
                assert props["params"]["speculative.p_min"] == 0.0
                # llama-server's per-request speculative.* fields
                r = c.post("/completion", json={**body, "speculative.n_max": 0})
                assert r.json()["tokens"] == plain[-1].tokens and "draft_n" not in r.json()["timings"]
                r = c.post("/completion", json={**body, "speculative.n_max": 2, "speculative.n_min": 5})
                t = r.json()["timings"]
                assert r.json()["tokens"] == plain[-1].tokens and 0 < t["draft_n"] <= 2 * (24 - t["draft_n_accepted"])
                gs = r.json()["generation_settings"]
                assert (gs["speculative.n_max"], gs["speculative.n_min"], gs["speculative.p_min"]) == (2, 2, 0.0)
                for bad in ({"speculative.p_min": 2}, {"speculative.n_max": -1}, {"speculative.n_max": 10**6}):
                    r = c.post("/completion", json={**body, **bad})
                    assert r.status_code == 400 and next(iter(bad)) in r.json()["error"]["message"]
        finally:
            srv.stop()


def test_a_lost_node_target_or_draft(paths):
    """The draft's node down: plain decoding (same tokens), drafting again once it is back; the
    target's node restarted mid-stream while drafting: the stream continues, equal to plain."""
    from test_engine import FlakyBackend

    ref = load_model(str(paths[0]), [LocalBackend()], n_ctx=512)
    try:
        plain = tokens_of(run(ref, PROMPT, n_predict=30)[0])
    finally:
        ref.close()
    dnode, tnode = FlakyBackend(), FlakyBackend()
    target = load_model(str(paths[0]), [LocalBackend(), tnode], n_ctx=512)
    draft = load_model(str(paths[1]), [dnode], n_ctx=512)
    spec = Speculative([ModelDrafter(draft, 1, retry_s=0.0)], SpecParams(n_max=4, p_min=0.0), target.n_vocab)
    try:
        dnode.down = True
        evs, _ = run(target, PROMPT, spec, n_predict=30)
        assert tokens_of(evs) == plain and evs[-1].timings.draft_n == 0
        dnode.down, dnode.restarted = False, True
        evs, _ = run(target, PROMPT, spec, n_predict=30)
        assert tokens_of(evs) == plain and evs[-1].timings.draft_n_accepted > 0
        assert draft.pipeline.epoch == 1

        eng = Engine(target, EngineConfig(warmup=False, node_grace=30.0), spec)
        eng.start()
        try:
            got = []
            for ev in eng.stream(PROMPT, TaskParams(sampling=GREEDY, n_predict=30, cache_prompt=False)):
                if isinstance(ev, PartialEvent):
                    got += ev.tokens
                    if len(got) >= 5 and target.pipeline.epoch == 0:
                        tnode.restarted = True
            assert isinstance(ev, FinalEvent) and got == plain and ev.timings.draft_n_accepted > 0
            assert target.pipeline.epoch == 1
        finally:
            eng.stop()
    finally:
        spec.close()
        target.close()
