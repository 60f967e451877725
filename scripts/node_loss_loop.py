#!/usr/bin/env python
"""kill -9 of a node mid-stream, restarted ~2 s later, N times: every stream must complete with the
text of an undisturbed greedy run (issue 10). One frontend engine over two llamarpc-server
processes on 127.0.0.1, the real model by default:

    python scripts/node_loss_loop.py [--rounds 10] [--streams 3] [--n-predict 48] [--delay 2] [-m MODEL]
    python scripts/node_loss_loop.py --for-good   # three nodes, one killed and never restarted

Each round starts the streams, waits for a few tokens, kills node 1 (or, with --for-good, the
middle of three nodes, once), restarts it after --delay seconds and compares every stream's
tokens with the undisturbed run. Prints one row per round and the totals (lost / completed /
equal); exits 1 if a stream was lost or differs. tests/test_node_loss.py runs one round of each
on a synthetic model.
"""
from __future__ import annotations

import argparse
import logging
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llamarpc.client.remote import RemoteBackend  # noqa: E402
from llamarpc.frontend.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    ErrorEvent,
    FinalEvent,
    PartialEvent,
    Task,
    TaskParams,
    load_model,  # noqa: E402
)
from llamarpc.frontend.sampling import SamplingParams  # noqa: E402
from nodeproc import start_node  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "List three uses of copper:",
           "Once upon a time, in a small village,", "def fibonacci(n):"]


def run_streams(eng: Engine, prompts: list[list[int]], n_predict: int, on_tokens=None) -> list:
    """Submit the prompts at once; call on_tokens() once every stream has 3 tokens; the finals."""
    box: dict[int, queue.Queue] = {}
    counts: dict[int, int] = {}
    tasks = []
    for p in prompts:
        q: queue.Queue = queue.Queue()
        t = Task(list(p), TaskParams(sampling=SamplingParams(temperature=0.0), n_predict=n_predict,
                                     ignore_eos=True, cache_prompt=False), q.put)
        box[t.id], counts[t.id] = q, 0
        tasks.append(t)
        eng.submit(t)
    finals: dict[int, object] = {}
    fired = on_tokens is None
    deadline = time.monotonic() + 300
    while len(finals) < len(tasks) and time.monotonic() < deadline:
        for t in tasks:
            if t.id in finals:
                continue
            try:
                ev = box[t.id].get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(ev, PartialEvent):
                counts[t.id] += 1
            elif isinstance(ev, (FinalEvent, ErrorEvent)):
                finals[t.id] = ev
        if not fired and all(c >= 3 for c in counts.values()):
            fired = True
            on_tokens()
    return [finals.get(t.id) for t in tasks]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=48)
    ap.add_argument("--delay", type=float, default=2.0, help="seconds between the kill and the restart")
    ap.add_argument("--grace", type=float, default=30.0, help="the engine's --node-grace")
    ap.add_argument("--for-good", action="store_true", help="three nodes, the middle one killed for good")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO if a.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="node-loss-"))
    nodes = [start_node(tmp, ready_timeout=180) for _ in range(3 if a.for_good else 2)]
    eng = None
    lost = completed = equal = 0
    try:
        model = load_model(a.model, [RemoteBackend(n.address) for n in nodes], n_ctx=2048)
        eng = Engine(model, EngineConfig(n_parallel=a.streams, node_grace=0.5 if a.for_good else a.grace))
        eng.start()
        tok = model.tokenizer
        prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(a.streams)]
        want = [f.tokens for f in run_streams(eng, prompts, a.n_predict)]
        print(f"{'round':>5}  {'completed':>9}  {'equal':>5}  {'lost':>4}  {'pause s':>7}  how")
        rounds = 1 if a.for_good else a.rounds
        victim = nodes[1]
        for r in range(rounds):
            timer: list[threading.Timer] = []
            t_kill = [0.0]

            def kill(timer: list = timer, t_kill: list = t_kill) -> None:
                t_kill[0] = time.monotonic()
                victim.kill9()
                if not a.for_good:
                    timer.append(threading.Timer(a.delay, victim.restart))
                    timer[0].start()

            before = eng.recovery.stats.n_reattached, eng.recovery.stats.n_replaced
            finals = run_streams(eng, prompts, a.n_predict, on_tokens=kill)
            for t in timer:
                t.join()
            ok = [isinstance(f, FinalEvent) for f in finals]
            same = [o and f.tokens == w for o, f, w in zip(ok, finals, want)]
            completed += sum(ok)
            equal += sum(same)
            lost += len(finals) - sum(ok)
            st = eng.recovery.stats
            how = "re-attached" if st.n_reattached > before[0] else "re-placed" if st.n_replaced > before[1] else "?"
            print(f"{r + 1:>5}  {sum(ok):>9}  {sum(same):>5}  {len(finals) - sum(ok):>4}  "
                  f"{time.monotonic() - t_kill[0]:>7.1f}  {how}", flush=True)
        st = eng.recovery.stats
        print(f"total: {completed + lost} streams, lost {lost}, completed {completed}, equal {equal}; "
              f"{st.n_replayed_tokens} tokens replayed; nodes: "
              + ", ".join(f"{n['name']} {n['state']} {n['layers']}" for n in model.pipeline.nodes()))
    finally:
        if eng is not None:
            eng.stop()
            eng.model.close()
        for n in nodes:
            n.stop()
    return 0 if lost == 0 and equal == completed else 1


if __name__ == "__main__":
    sys.exit(main())
