"""Slots on disk (POST /slots/{id}?action=save|restore|erase): the KV rows read back from the
nodes, restored into another placement, the file checked as untrusted input, the HTTP shapes."""
from __future__ import annotations

import os
import threading
import time

import httpx
import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, TaskParams, load_model, slot_file
from llamarpc.frontend.sampling import SamplingParams
from serverproc import start_server
from synth import write_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("slotfile") / "m.gguf"
    write_model(path, n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=7)
    return path


def engine_on(path, backends, split=None, n_ctx=256, n_parallel=2) -> Engine:
    model = load_model(str(path), backends, n_ctx=n_ctx, tensor_split=split)
    eng = Engine(model, EngineConfig(n_parallel=n_parallel, warmup=False))
    eng.start()
    return eng


def run(eng: Engine, prompt: list[int], n: int, **kw) -> FinalEvent:
    last = list(eng.stream(prompt, TaskParams(sampling=GREEDY, n_predict=n, ignore_eos=True, **kw)))[-1]
    assert isinstance(last, FinalEvent), last
    return last


PROMPT = list(range(5, 45))


def test_restore_into_another_placement(synth, tmp_path):
    one = engine_on(synth, [LocalBackend()])
    two = engine_on(synth, [LocalBackend(), LocalBackend()], split=[1, 1])
    try:
        assert len(two.model.pipeline.stages) == 2
        first = run(one, PROMPT, 6, id_slot=1)
        cached = one.slots[1].cache
        assert len(cached) == len(PROMPT) + 5
        more = cached + [77, 78, 79]
        want = run(one, more, 8, id_slot=1)          # never erased: reuses the slot's cache
        assert want.timings.cache_n == len(cached)
        one.call(lambda e: slot_file.erase_slot(e, 1)).result()
        run(one, PROMPT, 6, id_slot=1)
        out = slot_file.save(one, 1, str(tmp_path), "s.bin")
        assert out["n_saved"] == len(cached) and out["n_written"] == os.path.getsize(tmp_path / "s.bin")
        assert first.tokens == run(one, PROMPT, 6, id_slot=0).tokens
        # restored on two nodes (other cells, other stages): same next tokens, from the cache
        run(two, [9, 9, 9, 9], 3, id_slot=0)        # slot 0 takes the lowest cells: slot 1's differ
        res = slot_file.restore(two, 1, str(tmp_path), "s.bin")
        assert res["n_restored"] == len(cached) and res["n_read"] == out["n_written"]
        assert two.slots[1].cache == cached
        # the rows on the nodes are the saved ones, byte for byte
        assert two.call(lambda e: slot_file.read_slot(e, 1)).result() == (tmp_path / "s.bin").read_bytes()
        got = run(two, more, 8, id_slot=1)
        assert got.timings.cache_n == len(cached)
        assert got.tokens == want.tokens
        # the rows matter: a file with its V rows zeroed restores and answers differently
        data = bytearray((tmp_path / "s.bin").read_bytes())
        head = slot_file.HEADER.size + 4 * len(cached)
        data[head:] = bytes(len(data) - head)
        (tmp_path / "z.bin").write_bytes(bytes(data))
        slot_file.restore(two, 1, str(tmp_path), "z.bin")
        assert run(two, more, 8, id_slot=1).tokens != want.tokens
        assert slot_file.erase(two, 1) == {"id_slot": 1, "n_erased": len(more) + 7}
        assert two.slots[1].cache == [] and not (two.kv.seq == 1).any()
    finally:
        for e in (one, two):
            e.stop()
            e.model.close()


def test_bad_files_are_refused(synth, tmp_path):
    eng = engine_on(synth, [LocalBackend()], n_ctx=128)
    other = tmp_path / "other.gguf"
    write_model(other, n_layer=4, n_embd=128, n_head=4, n_head_kv=4, n_ff=256, seed=7)
    eng2 = engine_on(other, [LocalBackend()], n_ctx=128)
    try:
        run(eng, PROMPT, 4, id_slot=0)
        slot_file.save(eng, 0, str(tmp_path), "good.bin")
        slot_file.save(eng2, 0, str(tmp_path), "empty.bin")   # another model's (other K/V width), no tokens
        good = (tmp_path / "good.bin").read_bytes()
        ident = slot_file.model_identity(eng.model)
        n = len(eng.slots[0].cache)
        cases = {
            "short.bin": good[:-1], "long.bin": good + b"\0", "magic.bin": b"X" + good[1:], "tiny.bin": good[:10],
            "version.bin": good[:8] + (99).to_bytes(4, "little") + good[12:],
            "ntok.bin": good[:slot_file.HEADER.size - 4] + (n + 1).to_bytes(4, "little") + good[slot_file.HEADER.size:],
            "huge.bin": good[:slot_file.HEADER.size - 4] + (10**6).to_bytes(4, "little") + good[slot_file.HEADER.size:],
        }
        h0 = slot_file.HEADER.size - 4 - 32
        cases["hash.bin"] = good[:h0] + bytes(32) + good[h0 + 32:]    # other architecture metadata
        bad_tok = bytearray(good)
        bad_tok[slot_file.HEADER.size:slot_file.HEADER.size + 4] = (10**6).to_bytes(4, "little")
        cases["token.bin"] = bytes(bad_tok)
        for name, data in cases.items():
            (tmp_path / name).write_bytes(data)
        for name in [*cases, "empty.bin", "missing.bin"]:
            with pytest.raises(slot_file.SlotFileError):
                slot_file.restore(eng, 1, str(tmp_path), name)
        assert eng.slots[1].cache == []
        assert slot_file.restore(eng, 1, str(tmp_path), "good.bin")["n_restored"] == n
        assert ident.data_bytes(n) + slot_file.HEADER.size == len(good)
    finally:
        for e in (eng, eng2):
            e.stop()
            e.model.close()


def test_f16_cache_round_trip(synth, tmp_path):
    """An F16 cache saves 2 bytes per value and restores into another placement; an F32 engine
    refuses the F16 file (the cache type is part of the identity)."""
    from llamarpc.proto.types import GGMLType

    def f16_engine(backends, split=None) -> Engine:
        model = load_model(str(synth), backends, n_ctx=256, tensor_split=split, kv_type=GGMLType.F16)
        eng = Engine(model, EngineConfig(n_parallel=2, warmup=False))
        eng.start()
        return eng

    a, b, c = f16_engine([LocalBackend()]), f16_engine([LocalBackend(), LocalBackend()], [1, 3]), \
        engine_on(synth, [LocalBackend()])
    try:
        run(a, PROMPT, 5, id_slot=0)
        n = len(a.slots[0].cache)
        out = slot_file.save(a, 0, str(tmp_path), "h.bin")
        ident = slot_file.model_identity(a.model)
        assert out["n_written"] == slot_file.HEADER.size + 4 * n + 2 * 4 * n * ident.n_embd_k * 2
        slot_file.restore(b, 1, str(tmp_path), "h.bin")
        assert b.call(lambda e: slot_file.read_slot(e, 1)).result() == (tmp_path / "h.bin").read_bytes()
        more = a.slots[0].cache + [50, 51]
        assert run(b, more, 6, id_slot=1).tokens == run(a, more, 6, id_slot=0).tokens
        with pytest.raises(slot_file.SlotFileError, match="another model or KV cache type"):
            slot_file.restore(c, 0, str(tmp_path), "h.bin")
    finally:
        for e in (a, b, c):
            e.stop()
            e.model.close()


@pytest.mark.parametrize("name", ["../x.bin", "a/b.bin", "..", ".", "", " x", "x.", "a\\b", "a\0b", "c:x", 5,
                                  "x" * 256])
def test_filename_refused(name):
    assert not slot_file.valid_filename(name)


def test_filename_plain():
    assert slot_file.valid_filename("slot-0_v1.bin") and slot_file.valid_filename("ünï.bin")


def test_http_slot_actions(synth, tmp_path):
    srv, url = start_server(["-m", str(synth), "-c", "256", "-np", "2", "--slot-save-path", str(tmp_path)])
    off, url_off = start_server(["-m", str(synth), "-c", "256"])
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/completion", json={"prompt": PROMPT, "n_predict": 4, "temperature": 0, "id_slot": 0,
                                            "ignore_eos": True})
            assert r.status_code == 200, r.text
            r = c.post("/slots/0?action=save", json={"filename": "a.bin"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"id_slot", "filename", "n_saved", "n_written", "timings"}
            assert body["n_saved"] == len(PROMPT) + 3 and body["filename"] == "a.bin"
            assert set(body["timings"]) == {"save_ms"}
            r = c.post("/slots/0?action=erase")
            assert r.json() == {"id_slot": 0, "n_erased": len(PROMPT) + 3}
            r = c.post("/slots/1?action=restore", json={"filename": "a.bin"})
            assert r.status_code == 200, r.text
            assert r.json()["n_restored"] == len(PROMPT) + 3 and set(r.json()["timings"]) == {"restore_ms"}
            for path, body, msg in [("/slots/0?action=save", {"filename": "../a.bin"}, "Invalid filename"),
                                    ("/slots/0?action=restore", {"filename": "/etc/passwd"}, "Invalid filename"),
                                    ("/slots/0?action=save", {}, "Invalid filename"),
                                    ("/slots/0?action=nope", {}, "Invalid action"),
                                    ("/slots/x?action=erase", {}, "Invalid slot ID"),
                                    ("/slots/2?action=erase", {}, "Invalid slot ID")]:
                r = c.post(path, json=body)
                assert r.status_code == 400, (path, r.text)
                assert r.json()["error"]["message"] == msg and r.json()["error"]["type"] == "invalid_request_error"
            (tmp_path / "junk.bin").write_bytes(b"junk" * 40)
            for name in ("junk.bin", "never.bin"):
                r = c.post("/slots/0?action=restore", json={"filename": name})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith("Unable to restore slot")
            assert not list(tmp_path.parent.glob("a.bin"))
            # a busy slot: the save waits for the request to end (llama-server defers it) and saves it all
            done: list = []
            t = threading.Thread(target=lambda: done.append(c.post("/completion", json={
                "prompt": PROMPT, "n_predict": 60, "temperature": 0, "id_slot": 1, "ignore_eos": True})))
            t.start()
            deadline = time.monotonic() + 30
            while not srv.state.engine.slots[1].busy and time.monotonic() < deadline:
                time.sleep(0.001)
            r = c.post("/slots/1?action=save", json={"filename": "busy.bin"})
            t.join()
            assert r.status_code == 200 and done[0].status_code == 200
            assert r.json()["n_saved"] == len(PROMPT) + 59
        r = httpx.post(url_off + "/slots/0?action=save", json={"filename": "a.bin"})
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
        assert "--slot-save-path" in r.json()["error"]["message"]
    finally:
        srv.stop()
        off.stop()


def test_runs():
    assert slot_file._runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 0, 3), (7, 3, 1), (9, 4, 2)]
    assert slot_file._runs(np.array([], np.int64)) == []


@pytest.mark.slow
def test_real_model_save_erase_restore(model_path, tmp_path):
    """SmolLM2 over HTTP: the next tokens after save -> erase -> restore equal those of a slot that
    was never erased, and come from the restored cache."""
    srv, url = start_server(["-m", str(model_path), "-c", "256", "--slot-save-path", str(tmp_path)])
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            prompt = c.post("/tokenize", json={"content": "The capital of France is", "add_special": True}).json()
            ask = {"n_predict": 6, "temperature": 0, "id_slot": 0, "cache_prompt": True, "return_tokens": True}
            first = c.post("/completion", json={"prompt": prompt["tokens"], **ask}).json()
            cached = prompt["tokens"] + first["tokens"][:-1]
            follow = cached + c.post("/tokenize", json={"content": " Paris"}).json()["tokens"]
            assert c.post("/slots/0?action=save", json={"filename": "fr.bin"}).json()["n_saved"] == len(cached)
            never = c.post("/completion", json={"prompt": follow, **ask}).json()
            assert never["timings"]["cache_n"] == len(cached)
            assert c.post("/slots/0?action=erase").json()["n_erased"] == len(follow) + 5
            r = c.post("/slots/0?action=restore", json={"filename": "fr.bin"})
            assert r.status_code == 200 and r.json()["n_restored"] == len(cached)
            again = c.post("/completion", json={"prompt": follow, **ask}).json()
            assert again["timings"]["cache_n"] == len(cached)
            assert again["tokens"] == never["tokens"]
    finally:
        srv.stop()


def test_slot_save_path_flag(tmp_path):
    from llamarpc.frontend.cli.args import build_parser
    from llamarpc.frontend.cli.server import slot_save_path
    from llamarpc.proto.cliargs import CLIError

    (tmp_path / "f").write_text("x")
    args = build_parser().parse_args(["-m", __file__, "--slot-save-path", str(tmp_path), "--context-shift"])
    assert slot_save_path(args.slot_save_path) == str(tmp_path) and args.context_shift
    assert not build_parser().parse_args(["-m", __file__]).context_shift     # off by default, as llama-server
    assert slot_save_path("") == ""
    for bad in (tmp_path / "f", tmp_path / "missing"):
        with pytest.raises(CLIError, match="not a directory"):
            slot_save_path(str(bad))
