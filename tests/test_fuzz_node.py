"""Fuzz a live ``llamarpc-server`` over gRPC: thousands of malformed or random requests on every rpc.

Whatever arrives, the node must answer within the deadline with success or a status among
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED / FAILED_PRECONDITION / OUT_OF_RANGE (never
INTERNAL or UNKNOWN), stay alive, and afterwards still compute correctly. The explicit cases in
``test_llama_cpp_rpc_advisories`` replay the classes of bug llama.cpp's rpc-server has had:
GHSA-wcr5-566p-9cwj / GHSA-5vm9-p64x-gqw9 / GHSA-mqp6-7pv6-fqjf (set/get/copy_tensor out of bounds),
GHSA-j8rj-fmpv-wcxw (graph_compute tensors with no buffer), llama.cpp#25288 (a quantized row that
is not a whole number of blocks), #26825 (GET_ROWS reading past its table) and friends.

The node runs with ``--mem 64`` (64 MiB of capacity) so that "allocate a lot" has a visible limit.
Requests are counted; the module sends well over 5,000.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.proto import PROTOCOL_VERSION, pb, pb_grpc
from llamarpc.proto.arrays import array_from_pb, array_to_pb
from llamarpc.proto.types import GGMLType as T
from nodeproc import NodeProc, channel, start_node

SESSION_KEY = "llamarpc-session"
CALL_TIMEOUT = 10.0
MEM_MIB = 64
U64 = 2**64 - 1
I64 = 2**63 - 1
C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.OUT_OF_RANGE}
REFUSED = ALLOWED - {C.OK}
MIN_TOTAL_REQUESTS = 5000

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

# Fixture buffers of the main session: name -> size. Their ids are never freed by the fuzzer.
FIXED_BUFFERS = {"a": 64, "b": 4096, "c": 1024}
# Tensors laid out in buffer "b" (offset, type, shape) for the structured graphs.
B_TENSORS = [
    (0, T.F32, (4, 8)), (128, T.F16, (8, 8)), (256, T.Q8_0, (4, 32)), (448, T.Q4_0, (4, 32)),
    (1024, T.F32, (16, 4)), (1536, T.F16, (16, 4)), (2048, T.I32, (4, 8)), (2304, T.BF16, (4, 8)),
]
CACHE_TENSORS = (4, 5)   # indices into B_TENSORS usable as K/V caches (F32 / F16, width 4)


class Fuzzer:
    """The client side: raw stubs, two sessions, fixture buffers and the request accounting."""

    def __init__(self, node: NodeProc) -> None:
        self.node = node
        self.channel = channel(node.address, options=[("grpc.max_receive_message_length", 128 << 20),
                                                      ("grpc.max_send_message_length", 128 << 20)])
        self.stub = pb_grpc.BackendStub(self.channel)
        self.count = 0
        self.codes: Counter[tuple[str, str]] = Counter()
        self.details: Counter[tuple[str, str]] = Counter()
        self.done: set[str] = set()
        self._streams: list[Any] = []
        self.main = self._hello("fuzz-main")
        self.other = self._hello("fuzz-other")
        self.witness = self._hello("fuzz-witness")   # no fuzzed request ever carries this session
        self.ids: dict[str, int] = {}
        for name, size in FIXED_BUFFERS.items():
            self.ids[name] = self.ok("AllocBuffer", pb.AllocBufferRequest(size=size)).buffer_id
        rng = np.random.default_rng(0)
        content = rng.standard_normal(1024).astype(np.float32).tobytes()
        self.ok("SetTensor", [pb.SetTensorChunk(header=pb.SetTensorHeader(buffer_id=self.ids["b"], size=4096),
                                                data=content)])
        self.ids["freed"] = self.ok("AllocBuffer", pb.AllocBufferRequest(size=32)).buffer_id
        self.ok("FreeBuffer", pb.BufferRequest(buffer_id=self.ids["freed"]))
        self.ids["other"] = self.ok("AllocBuffer", pb.AllocBufferRequest(size=256), session="other").buffer_id
        self.witness_bytes = bytes(range(256))
        self.witness_buf = self.ok("AllocBuffer", pb.AllocBufferRequest(size=256), session="witness").buffer_id
        self.ok("SetTensor", [pb.SetTensorChunk(header=pb.SetTensorHeader(buffer_id=self.witness_buf, size=256),
                                                data=self.witness_bytes)], session="witness")
        # bytes the node keeps in its weight cache, for SetTensorFromCache hits
        self.cached = bytes(range(64)) * 2
        self.cached_sha = hashlib.sha256(self.cached).digest()
        self.ok("SetTensor", [pb.SetTensorChunk(header=pb.SetTensorHeader(
            buffer_id=self.ids["c"], offset=0, size=len(self.cached), sha256=self.cached_sha, cache=True),
            data=self.cached)])
        self.protected = {self.ids[n] for n in FIXED_BUFFERS}

    def _hello(self, name: str) -> str:
        stream = self.stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION, client_name=name))
        self.count += 1
        self._streams.append(stream)
        return next(stream).session_id

    def close(self) -> None:
        for s in self._streams:
            s.cancel()
        self.channel.close()

    # -- calls ------------------------------------------------------------------------------------
    def metadata(self, session: Any) -> list[tuple[str, str]]:
        if session == "main":
            return [(SESSION_KEY, self.main)]
        if session == "other":
            return [(SESSION_KEY, self.other)]
        if session == "witness":
            return [(SESSION_KEY, self.witness)]
        if session == "none":
            return []
        if session == "unknown":
            return [(SESSION_KEY, "0" * 32)]
        return [(SESSION_KEY, str(session))]

    def buffer(self, tag: Any, *, protect: Any = None) -> int:
        """The buffer id a strategy's tag names; with protect=<session>, never one of the fixture
        buffers that session owns (so FreeBuffer cannot take them away from the other tests)."""
        n = self.ids[tag] if isinstance(tag, str) else int(tag[1])
        if protect is not None and (n in self.protected or (protect == "other" and n == self.ids["other"])):
            n += 1 << 40
        return n

    def call(self, rpc: str, request: Any, session: Any = "main", expect: set | None = None) -> tuple[Any, Any]:
        """One request; returns (status code, reply or error details) after checking the answer."""
        md = self.metadata(session)
        fn = getattr(self.stub, rpc)
        self.count += 1
        try:
            if rpc == "GetTensor":
                reply = b"".join(c.data for c in fn(request, metadata=md, timeout=CALL_TIMEOUT))
            elif rpc == "SetTensor":
                reply = fn(iter(request), metadata=md, timeout=CALL_TIMEOUT)
            elif rpc == "Hello":
                stream = fn(request, metadata=md, timeout=CALL_TIMEOUT)
                try:
                    reply = next(stream)
                finally:
                    stream.cancel()
            else:
                reply = fn(request, metadata=md, timeout=CALL_TIMEOUT)
            code = C.OK
        except grpc.RpcError as e:
            code, reply = e.code(), e.details()
        self.codes[(rpc, code.name)] += 1
        if code != C.OK:
            self.details[(rpc, str(reply)[:50])] += 1
        assert code != C.DEADLINE_EXCEEDED, f"{rpc} hung: no answer within {CALL_TIMEOUT} s"
        assert code in ALLOWED, f"{rpc} answered {code.name}: {reply}"
        assert self.node.alive(), f"the node died on {rpc}:\n{self.node.stderr_text()[-4000:]}"
        if expect is not None:
            assert code in expect, f"{rpc}: expected {sorted(c.name for c in expect)}, got {code.name}: {reply}"
        return code, reply

    def ok(self, rpc: str, request: Any, session: Any = "main") -> Any:
        return self.call(rpc, request, session, expect={C.OK})[1]

    def refused(self, rpc: str, request: Any, *codes: grpc.StatusCode, session: Any = "main") -> str:
        return self.call(rpc, request, session, expect=set(codes) or REFUSED)[1]


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory):
    node = start_node(tmp_path_factory.mktemp("fuzz"), "--mem", str(MEM_MIB))
    f = Fuzzer(node)
    yield f
    f.close()
    node.stop()


# -- strategies -------------------------------------------------------------------------------------
# Mostly the main session; else none, an unknown one, the other session's, or any printable string.
SESSIONS = st.tuples(st.integers(0, 19), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)).map(
    lambda t: "main" if t[0] < 14 else {14: "none", 15: "unknown", 16: "other", 17: "other"}.get(t[0], t[1]))
EDGES = [0, 1, 4, 31, 32, 33, 63, 64, 65, 255, 256, 1023, 1024, 1025, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32,
         I64, 2**63, U64 - 31, U64 - 1, U64]
U64S = st.one_of(st.integers(0, 4200), st.sampled_from(EDGES), st.integers(0, U64))
U32S = st.one_of(st.integers(0, 300), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
BUFS = st.one_of(st.sampled_from([*FIXED_BUFFERS, "freed", "other"]),
                 st.tuples(st.just("raw"), st.one_of(st.integers(0, 64), st.sampled_from([0, 2**63, U64]),
                                                     st.integers(0, U64))))
SHA = st.one_of(st.just(b""), st.binary(min_size=32, max_size=32), st.binary(max_size=40), st.just("right"))
FLOATS = st.one_of(st.sampled_from([0.0, 1e-5, 1e-6, 0.5, 1.0, 2.0, -1.0, 1e4, 10000.0]),
                   st.floats(width=32), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
INT32S = st.one_of(st.sampled_from([0, 1, 2, 4, 8]), st.integers(-2, 20), st.integers(-2**31, 2**31 - 1))
TYPE_IDS = st.one_of(st.sampled_from([0, 1, 2, 3, 8, 12, 14, 26, 30]), st.integers(0, 40), st.integers(0, 2**32 - 1))
OP_TYPES = st.one_of(st.integers(0, 16), st.integers(-2**31, 2**31 - 1))
NAMES = st.one_of(st.sampled_from(["x", "y", "ids", "pos", "n", "m", "l"]), st.text(max_size=12))
DIMS = st.one_of(st.integers(-3, 9).map(lambda n: pb.Dim(size=n)),
                 st.sampled_from([2**24, 2**24 + 1, 2**40, I64, -2**63]).map(lambda n: pb.Dim(size=n)),
                 NAMES.map(lambda s: pb.Dim(symbol=s)), st.just(pb.Dim()))
SHAPE_INTS = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**32, 2**40, 2**62, I64, -2**63]))
ATTRS = st.builds(pb.Attrs, eps=FLOATS, scale=FLOATS, head_dim=INT32S, n_dims=INT32S, rope_mode=INT32S,
                  freq_base=FLOATS, freq_scale=FLOATS, n_head=INT32S, n_head_kv=INT32S,
                  sliding_window=INT32S, softcap=FLOATS, pooling=INT32S,
                  non_causal=st.booleans())


def _arr_bytes(shape: list[int], itemsize: int, rng: np.random.Generator) -> bytes:
    n = 1
    for d in shape:
        n *= max(d, 0)
    return rng.integers(0, 256, size=min(n, 1 << 16) * itemsize, dtype=np.uint8).tobytes()


ARRAYS = st.tuples(st.one_of(st.sampled_from([0, 26]), TYPE_IDS),
                   st.lists(st.one_of(st.integers(-1, 6), st.sampled_from([0, 2**24 + 1, 2**40, I64])), max_size=5),
                   st.sampled_from(["exact", "exact", "exact", "random"]), st.binary(max_size=64),
                   st.integers(0, 2**32 - 1))


def build_array(spec: tuple) -> pb.Array:
    type_id, shape, mode, raw, seed = spec
    itemsize = 4
    if mode == "exact":
        raw = _arr_bytes(shape, itemsize, np.random.default_rng(seed))
    return pb.Array(type=type_id, shape=shape, data=raw)


# -- session / memory rpcs --------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(version=st.one_of(st.sampled_from([0, PROTOCOL_VERSION, 2]), st.integers(0, 2**32 - 1)),
       name=st.text(max_size=300), session=SESSIONS)
def test_fuzz_hello(fz, version, name, session):
    code, reply = fz.call("Hello", pb.HelloRequest(protocol_version=version, client_name=name), session)
    if version != PROTOCOL_VERSION:   # (or the session cap, should cancelled sessions linger)
        assert code in (C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED)
    elif code == C.OK:
        assert reply.session_id and reply.protocol_version == PROTOCOL_VERSION


def test_fuzz_hello_done(fz):
    assert fz.codes[("Hello", "OK")] and fz.codes[("Hello", "FAILED_PRECONDITION")]
    fz.done.add("hello")


@settings(FUZZ, max_examples=120)
@given(session=SESSIONS)
def test_fuzz_get_memory(fz, session):
    code, reply = fz.call("GetMemory", pb.GetMemoryRequest(), session)
    if code == C.OK:
        assert reply.total_bytes == MEM_MIB << 20 and reply.free_bytes <= reply.total_bytes
    fz.done.add("get_memory")


BUFFER_OPS = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.one_of(st.integers(0, 8192), st.sampled_from(
        [0, 1, MEM_MIB << 20, (MEM_MIB << 20) + 1, 2**63, U64]), st.integers(0, U64)), SESSIONS),
    st.tuples(st.just("free"), st.one_of(st.just("new"), BUFS), SESSIONS),
    st.tuples(st.just("clear"), st.one_of(st.just("new"), BUFS), U32S, SESSIONS),
), min_size=1, max_size=8)


@settings(FUZZ, max_examples=300)
@given(ops=BUFFER_OPS)
def test_fuzz_buffers(fz, ops):
    new: list[tuple[int, Any]] = []   # (buffer id, session) allocated by this example
    for op in ops:
        if op[0] == "alloc":
            code, reply = fz.call("AllocBuffer", pb.AllocBufferRequest(size=op[1]), op[2])
            if code == C.OK:
                assert reply.size == op[1] and 0 < op[1] <= MEM_MIB << 20
                new.append((reply.buffer_id, op[2]))
            elif op[1] == 0:
                assert code in (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION)
            elif op[1] > MEM_MIB << 20:
                assert code in (C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION)
            continue
        if op[1] == "new":
            if not new:
                continue
            bid = new[-1][0]
        else:
            bid = fz.buffer(op[1], protect=op[2])
        if op[0] == "free":
            code, _ = fz.call("FreeBuffer", pb.BufferRequest(buffer_id=bid), op[2])
            if code == C.OK:
                new = [(b, s) for b, s in new if b != bid]
        else:
            code, _ = fz.call("ClearBuffer", pb.ClearBufferRequest(buffer_id=bid, value=op[2]), op[3])
            if code == C.OK:
                assert op[2] <= 255
    for bid, session in new:
        fz.ok("FreeBuffer", pb.BufferRequest(buffer_id=bid), session)
    fz.done.add("buffers")


# -- tensor bytes -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=700)
@given(buf=BUFS, offset=U64S, size_mode=st.sampled_from(["exact", "exact", "less", "more", "random"]),
       size=U64S, chunks=st.lists(st.binary(max_size=300), max_size=4),
       header_at=st.sampled_from(["first", "first", "first", "none", "second", "every"]),
       sha=SHA, cache=st.booleans(), session=SESSIONS)
def test_fuzz_set_tensor(fz, buf, offset, size_mode, size, chunks, header_at, sha, cache, session):
    total = sum(len(c) for c in chunks)
    size = {"exact": total, "less": max(0, total - 1), "more": total + 1}.get(size_mode, size)
    data = b"".join(chunks)
    digest = hashlib.sha256(data).digest() if sha == "right" else sha
    header = pb.SetTensorHeader(buffer_id=fz.buffer(buf), offset=offset, size=size, sha256=digest, cache=cache)
    msgs = [pb.SetTensorChunk(data=c) for c in chunks] or [pb.SetTensorChunk()]
    if header_at == "first":
        msgs[0].header.CopyFrom(header)
    elif header_at == "second" and len(msgs) > 1:
        msgs[1].header.CopyFrom(header)
    elif header_at == "every":
        for m in msgs:
            m.header.CopyFrom(header)
    code, reply = fz.call("SetTensor", msgs, session)
    if code == C.OK:
        assert reply.bytes_written == total == size
        assert offset + size <= FIXED_BUFFERS.get(buf, 1 << 30)
    fz.done.add("set_tensor")


@settings(FUZZ, max_examples=300)
@given(buf=BUFS, offset=U64S, size=st.one_of(st.just("right"), U64S), sha=st.one_of(st.just("cached"), SHA),
       session=SESSIONS)
def test_fuzz_set_tensor_from_cache(fz, buf, offset, size, sha, session):
    digest = fz.cached_sha if sha in ("cached", "right") else sha
    size = len(fz.cached) if size == "right" else size
    code, reply = fz.call("SetTensorFromCache", pb.SetTensorFromCacheRequest(
        buffer_id=fz.buffer(buf), offset=offset, size=size, sha256=digest), session)
    if code == C.OK and reply.hit:
        assert digest == fz.cached_sha and size == len(fz.cached)
    fz.done.add("set_tensor_from_cache")


@settings(FUZZ, max_examples=450)
@given(buf=BUFS, offset=U64S, size=U64S, session=SESSIONS)
def test_fuzz_get_tensor(fz, buf, offset, size, session):
    code, reply = fz.call("GetTensor", pb.GetTensorRequest(buffer_id=fz.buffer(buf), offset=offset, size=size),
                          session)
    if code == C.OK:
        assert len(reply) == size and offset + size <= FIXED_BUFFERS.get(buf, 1 << 30)
    if buf == "other" and session != "other":
        assert code != C.OK, "read another session's buffer"
    fz.done.add("get_tensor")


@settings(FUZZ, max_examples=450)
@given(src=BUFS, src_off=U64S, dst=BUFS, dst_off=U64S, size=U64S, session=SESSIONS)
def test_fuzz_copy_tensor(fz, src, src_off, dst, dst_off, size, session):
    code, _ = fz.call("CopyTensor", pb.CopyTensorRequest(
        src_buffer_id=fz.buffer(src), src_offset=src_off, dst_buffer_id=fz.buffer(dst), dst_offset=dst_off,
        size=size), session)
    if code == C.OK:
        assert src_off + size <= FIXED_BUFFERS.get(src, 1 << 30) and dst_off + size <= FIXED_BUFFERS.get(dst, 1 << 30)
    if "other" in (src, dst) and session != "other":
        assert code != C.OK
    fz.done.add("copy_tensor")


# -- graphs -----------------------------------------------------------------------------------------
RANDOM_GRAPHS = st.tuples(
    st.lists(st.tuples(NAMES, TYPE_IDS, st.lists(DIMS, max_size=5)), max_size=4),
    st.lists(st.tuples(BUFS, st.one_of(st.sampled_from([0, 32, 128, 1024, 4064, 4096]), U64S), TYPE_IDS,
                       st.lists(SHAPE_INTS, max_size=5)), max_size=3),
    st.lists(st.tuples(OP_TYPES, st.lists(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)), max_size=11),
                       ATTRS), max_size=5),
    st.lists(st.tuples(NAMES, st.one_of(st.integers(0, 14), st.integers(0, 2**32 - 1))), max_size=3),
)


def build_random_graph(fz: Fuzzer, spec: tuple) -> pb.Graph:
    inputs, tensors, ops, outputs = spec
    return pb.Graph(
        inputs=[pb.GraphInput(name=n, type=t, shape=dims) for n, t, dims in inputs],
        tensors=[pb.TensorRef(buffer_id=fz.buffer(b), offset=o, type=t, shape=s) for b, o, t, s in tensors],
        ops=[pb.Op(type=t, args=a, attrs=at) for t, a, at in ops],
        outputs=[pb.GraphOutput(name=n, value=v) for n, v in outputs])


@settings(FUZZ, max_examples=500)
@given(spec=RANDOM_GRAPHS, session=SESSIONS, data=st.data())
def test_fuzz_random_graphs(fz, spec, session, data):
    graph = build_random_graph(fz, spec)
    code, reply = fz.call("RegisterGraph", pb.RegisterGraphRequest(graph=graph), session)
    gid = reply.graph_id if code == C.OK else data.draw(U64S, "graph_id")
    names = [i.name for i in graph.inputs]
    for _ in range(data.draw(st.integers(1, 2), "computes")):
        named = data.draw(st.lists(st.tuples(st.one_of(st.sampled_from(names), NAMES) if names else NAMES, ARRAYS),
                                   max_size=4), "inputs")
        fz.call("Compute", pb.ComputeRequest(graph_id=gid, inputs=[
            pb.NamedArray(name=n, array=build_array(a)) for n, a in named]), session)
    if code == C.OK:
        fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid), session)
        fz.refused("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid), C.NOT_FOUND, session=session)
    else:
        fz.call("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid), session)
    fz.done.add("random_graphs")


# Plausible graphs: named inputs, the tensors laid out in buffer "b", and ops whose arguments are
# drawn among the earlier values, so that many register and reach the kernels at Compute.
PLAUSIBLE_INPUTS = [("x", T.F32, ("n", 8)), ("h", T.F32, ("n", 4)), ("z", T.F32, ("n", 32)),
                    ("ids", T.I32, ("n",)), ("pos", T.I32, ("n",)), ("kvp", T.I32, ("l",))]
ALL_OPS = [pb.GET_ROWS, pb.RMS_NORM, pb.LAYER_NORM, pb.MATMUL, pb.ADD, pb.MUL, pb.SCALE, pb.ROPE, pb.ATTENTION,
           pb.SILU, pb.GELU, pb.SWIGLU, pb.SOFTMAX, pb.SOFTCAP, pb.POOL, pb.ROPE_SHIFT]
ARITY = {pb.GET_ROWS: 2, pb.MATMUL: 2, pb.ADD: 2, pb.MUL: 2, pb.ROPE: 2, pb.ATTENTION: 10, pb.SWIGLU: 2, pb.POOL: 2,
         pb.ROPE_SHIFT: 3}
GOOD_ATTRS = st.builds(
    pb.Attrs, eps=st.sampled_from([1e-5, 1e-6]), scale=st.sampled_from([1.0, 0.5, 30.0]),
    head_dim=st.sampled_from([4, 2, 8]), n_dims=st.sampled_from([4, 2]), rope_mode=st.sampled_from([0, 2]),
    freq_base=st.sampled_from([10000.0, 500000.0]), freq_scale=st.sampled_from([1.0, 0.25]),
    n_head=st.sampled_from([2, 1, 8]), n_head_kv=st.sampled_from([1, 2]), sliding_window=st.sampled_from([0, 2]),
    softcap=st.sampled_from([0.0, 20.0]), pooling=st.sampled_from([1, 2, 3]))
INT_VALUES = st.one_of(st.integers(-1, 17), st.sampled_from([-2**31, 2**31 - 1, 32, 100]))
FLOAT_VALUES = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                      3e38, -3e38, 0.0]))


def draw_plausible_graph(fz: Fuzzer, data: st.DataObject) -> tuple[pb.Graph, list]:
    chosen = [spec for spec in PLAUSIBLE_INPUTS if data.draw(st.booleans(), spec[0])] or [PLAUSIBLE_INPUTS[0]]
    inputs = [pb.GraphInput(name=n, type=int(t), shape=[pb.Dim(symbol=d) if isinstance(d, str) else pb.Dim(size=d)
                                                         for d in shape]) for n, t, shape in chosen]
    tensors = []
    for off, t, shape in B_TENSORS:
        ref = pb.TensorRef(buffer_id=fz.ids["b"], offset=off, type=int(t), shape=list(shape))
        # hypothesis favours the ends of a range: the rare branches sit in the middle
        mutation = {17: "buffer", 18: "offset", 19: "type", 20: "shape"}.get(data.draw(st.integers(0, 39), "mutate"))
        if mutation == "buffer":
            ref.buffer_id = fz.buffer(data.draw(BUFS, "buffer"))
        elif mutation == "offset":
            ref.offset = data.draw(U64S, "offset")
        elif mutation == "type":
            ref.type = data.draw(TYPE_IDS, "type")
        elif mutation == "shape":
            ref.shape[:] = data.draw(st.lists(SHAPE_INTS, max_size=5), "shape")
        tensors.append(ref)
    n_in, n_t = len(inputs), len(tensors)
    ops = []
    for j in range(data.draw(st.integers(1, 5), "n_ops")):
        t = data.draw(st.sampled_from(ALL_OPS), "op")
        earlier = st.integers(0, n_in + n_t + j - 1)
        if t == pb.ATTENTION:
            caches = st.one_of(st.sampled_from([n_in + i for i in CACHE_TENSORS]), earlier)
            args = [data.draw(earlier, "q"), data.draw(earlier, "k"), data.draw(earlier, "v"),
                    data.draw(caches, "k_cache"), data.draw(caches, "v_cache"),
                    *data.draw(st.lists(earlier, min_size=5, max_size=5), "cells..kv_seq")]
        elif t == pb.ROPE_SHIFT:
            caches = st.one_of(st.sampled_from([n_in + i for i in CACHE_TENSORS]), earlier)
            args = [data.draw(caches, "k_cache"), *data.draw(st.lists(earlier, min_size=2, max_size=2), "cells, delta")]
        else:
            args = data.draw(st.lists(earlier, min_size=ARITY.get(t, 1), max_size=ARITY.get(t, 1)), "args")
        attrs = data.draw(ATTRS if data.draw(st.integers(0, 9), "bad attrs") == 5 else GOOD_ATTRS, "attrs")
        ops.append(pb.Op(type=t, args=args, attrs=attrs))
    n_values = n_in + n_t + len(ops)
    outs = data.draw(st.lists(st.integers(0, n_values - 1), min_size=1, max_size=3, unique=True), "outputs")
    outs = sorted(set(outs) | {n_values - 1})
    graph = pb.Graph(inputs=inputs, tensors=tensors, ops=ops,
                     outputs=[pb.GraphOutput(name=f"o{k}", value=v) for k, v in enumerate(outs)])
    return graph, chosen


def draw_inputs(data: st.DataObject, chosen: list) -> list[pb.NamedArray]:
    sym = {"n": data.draw(st.sampled_from([1, 2, 3, 0, 5]), "n"),
           "l": data.draw(st.sampled_from([4, 16, 0, 1, 17, 100]), "l")}
    out = []
    for name, t, shape in chosen:
        if data.draw(st.integers(0, 19), "skip") == 0:
            continue
        dims = [sym[d] if isinstance(d, str) else d for d in shape]
        if data.draw(st.integers(0, 9), "bad shape") == 0:
            dims = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3), "dims")
        t_sent = t if data.draw(st.integers(0, 14), "flip type") else (T.I32 if t == T.F32 else T.F32)
        n = int(np.prod(dims))
        if t_sent == T.I32:
            values = np.array(data.draw(st.lists(INT_VALUES, min_size=n, max_size=n), name), np.int32)
        else:
            values = np.array(data.draw(st.lists(FLOAT_VALUES, min_size=n, max_size=n), name), np.float32)
        out.append(pb.NamedArray(name=name, array=array_to_pb(values.reshape(dims))))
    if data.draw(st.integers(0, 19), "extra") == 0:
        out.append(pb.NamedArray(name=data.draw(NAMES, "extra name"), array=build_array(data.draw(ARRAYS, "x"))))
    return out


@settings(FUZZ, max_examples=1200)
@given(data=st.data())
def test_fuzz_plausible_graphs(fz, data):
    graph, chosen = draw_plausible_graph(fz, data)
    code, reply = fz.call("RegisterGraph", pb.RegisterGraphRequest(graph=graph))
    if code != C.OK:
        return
    for _ in range(data.draw(st.integers(1, 3), "computes")):
        code, out = fz.call("Compute", pb.ComputeRequest(graph_id=reply.graph_id, inputs=draw_inputs(data, chosen)))
        if code == C.OK:
            assert {o.name for o in out.outputs} == {o.name for o in graph.outputs}
            for o in out.outputs:
                array_from_pb(o.array, o.name)
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=reply.graph_id))
    fz.done.add("plausible_graphs")


@settings(FUZZ, max_examples=200)
@given(graph_id=U64S, session=SESSIONS, names=st.lists(st.tuples(NAMES, ARRAYS), max_size=70))
def test_fuzz_compute_and_release_unknown_graphs(fz, graph_id, session, names):
    fz.call("Compute", pb.ComputeRequest(graph_id=graph_id, inputs=[
        pb.NamedArray(name=n, array=build_array(a)) for n, a in names]), session)
    fz.call("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=graph_id), session)
    fz.done.add("unknown_graphs")


# -- the advisories, one by one ---------------------------------------------------------------------
def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _set(bid: int, offset: int, data: bytes, size: int | None = None) -> list[pb.SetTensorChunk]:
    header = pb.SetTensorHeader(buffer_id=bid, offset=offset, size=len(data) if size is None else size)
    return [pb.SetTensorChunk(header=header, data=data)]


def _compute(gid: int, **arrays: np.ndarray) -> pb.ComputeRequest:
    return pb.ComputeRequest(graph_id=gid, inputs=[pb.NamedArray(name=k, array=array_to_pb(v))
                                                   for k, v in arrays.items()])


def test_llama_cpp_rpc_advisories(fz):
    IA, NF, RE, FP = C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION
    hwm0 = _vm_hwm_kib(fz.node.pid)
    a = fz.ok("AllocBuffer", pb.AllocBufferRequest(size=1024)).buffer_id
    other, freed = fz.ids["other"], fz.ids["freed"]

    # set_tensor / get_tensor / copy_tensor out of bounds (GHSA-wcr5-566p-9cwj, -5vm9-p64x-gqw9, -mqp6-7pv6-fqjf)
    for off, data, size in [(1024, b"\1", None), (1020, b"\1" * 8, None), (U64, b"\1\1", None), (8, b"\1", U64),
                            (2**63, b"", 2**63), (U64 - 7, b"\1" * 8, None), (0, b"\1" * 1025, None)]:
        fz.refused("SetTensor", _set(a, off, data, size), IA)
    fz.refused("SetTensor", _set(a, 0, b"\1" * 8, 4), IA)                   # more bytes than announced
    fz.refused("SetTensor", _set(a, 0, b"\1" * 4, 8), IA)                   # fewer
    fz.refused("SetTensor", [pb.SetTensorChunk(data=b"\1" * 4)], IA)        # no header
    fz.refused("SetTensor", [], IA)                                          # no chunks at all
    fz.refused("SetTensor", _set(freed, 0, b"\1"), NF)
    fz.refused("SetTensor", _set(other, 0, b"\1"), NF)                       # another session's buffer
    bad_sha = [pb.SetTensorChunk(header=pb.SetTensorHeader(buffer_id=a, size=4, sha256=b"\0" * 32, cache=True),
                                 data=b"abcd")]
    fz.refused("SetTensor", bad_sha, IA)
    bad_sha[0].header.sha256 = b"\0" * 5
    fz.refused("SetTensor", bad_sha, IA)
    for off, size in [(U64, 2), (2**63, 2**63), (1024, 1), (1, U64)]:
        fz.refused("SetTensorFromCache", pb.SetTensorFromCacheRequest(
            buffer_id=a, offset=off, size=size, sha256=fz.cached_sha), IA)
    fz.refused("SetTensorFromCache", pb.SetTensorFromCacheRequest(buffer_id=other, size=128, sha256=fz.cached_sha),
               NF)
    for off, size in [(1024, 1), (0, 1025), (U64, 1), (1, U64), (2**63, 2**63), (U64 - 7, 16)]:
        fz.refused("GetTensor", pb.GetTensorRequest(buffer_id=a, offset=off, size=size), IA)
    fz.refused("GetTensor", pb.GetTensorRequest(buffer_id=freed, size=1), NF)
    fz.refused("GetTensor", pb.GetTensorRequest(buffer_id=other, size=1), NF)
    fz.refused("GetTensor", pb.GetTensorRequest(buffer_id=0, size=1), NF)
    for so, do, size in [(0, 0, 1025), (U64, 0, 2), (0, U64, 2), (2**63, 0, 2**63), (1000, 0, 100), (0, 1000, 100)]:
        fz.refused("CopyTensor", pb.CopyTensorRequest(src_buffer_id=a, src_offset=so, dst_buffer_id=a,
                                                      dst_offset=do, size=size), IA)
    fz.refused("CopyTensor", pb.CopyTensorRequest(src_buffer_id=other, dst_buffer_id=a, size=8), NF)
    fz.refused("CopyTensor", pb.CopyTensorRequest(src_buffer_id=a, dst_buffer_id=other, size=8), NF)
    fz.ok("CopyTensor", pb.CopyTensorRequest(src_buffer_id=a, src_offset=0, dst_buffer_id=a, dst_offset=8, size=64))
    fz.refused("ClearBuffer", pb.ClearBufferRequest(buffer_id=other), NF)
    fz.refused("ClearBuffer", pb.ClearBufferRequest(buffer_id=a, value=256), IA)
    fz.refused("FreeBuffer", pb.BufferRequest(buffer_id=other), NF)
    fz.refused("FreeBuffer", pb.BufferRequest(buffer_id=freed), NF)           # double free
    fz.refused("AllocBuffer", pb.AllocBufferRequest(size=U64), RE)
    fz.refused("AllocBuffer", pb.AllocBufferRequest(size=(MEM_MIB << 20) + 1), RE)
    fz.refused("AllocBuffer", pb.AllocBufferRequest(size=0), IA)
    for rpc, req in [("AllocBuffer", pb.AllocBufferRequest(size=8)), ("FreeBuffer", pb.BufferRequest(buffer_id=a)),
                     ("ClearBuffer", pb.ClearBufferRequest(buffer_id=a)), ("SetTensor", _set(a, 0, b"x")),
                     ("GetTensor", pb.GetTensorRequest(buffer_id=a, size=1)),
                     ("CopyTensor", pb.CopyTensorRequest(src_buffer_id=a, dst_buffer_id=a, size=1)),
                     ("SetTensorFromCache", pb.SetTensorFromCacheRequest(buffer_id=a, size=128,
                                                                         sha256=fz.cached_sha)),
                     ("RegisterGraph", pb.RegisterGraphRequest()), ("ReleaseGraph", pb.ReleaseGraphRequest()),
                     ("Compute", pb.ComputeRequest())]:
        for session in ("none", "unknown", "other"):
            if session == "other" and rpc in ("AllocBuffer", "RegisterGraph"):
                continue   # a valid session for these; only the buffer or graph is someone else's
            fz.refused(rpc, req, FP, NF, session=session)

    # graphs: tensors with no / a freed / another session's buffer (GHSA-j8rj-fmpv-wcxw), bad types and shapes
    def graph(ref: pb.TensorRef | None = None, **change: Any) -> pb.Graph:
        gb = GraphBuilder()
        x = gb.input("x", T.F32, ("n", 8))
        w = gb.tensor(TensorRef(a, 0, T.F32, (4, 8)))
        gb.output("y", gb.rms_norm(gb.matmul(x, w), 1e-5))
        g = gb.build()
        if ref is not None:
            g.tensors[0].CopyFrom(ref)
        for k, v in change.items():
            setattr(g.tensors[0], k, v)
        return g

    fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(buffer_id=0)), NF)
    fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(buffer_id=freed)), NF)
    fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(buffer_id=other)), NF)
    fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(buffer_id=U64)), NF)
    for change in [dict(offset=1024), dict(offset=1024 - 96), dict(offset=U64 - 31), dict(offset=2**63),
                   dict(offset=4), dict(type=99), dict(type=2**32 - 1), dict(type=4), dict(type=int(T.Q4_0)),
                   dict(type=int(T.Q6_K))]:
        fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(**change)), IA)
    for shape in [[0, 8], [-1, 8], [4, -8], [], [1, 1, 1, 1, 8], [2**31] * 4, [2**62, 2**62], [I64, 2],
                  [-2**63, -2**63], [2**40, 2**40, 8], [I64, I64, I64, I64]]:
        ref = pb.TensorRef(buffer_id=a, offset=0, type=int(T.F32), shape=shape)
        fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(ref)), IA)
    # a quantized row that is not a whole number of blocks (llama.cpp#25288)
    fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=graph(pb.TensorRef(
        buffer_id=a, type=int(T.Q8_0), shape=[1, 1]))), IA)
    for mutate in [lambda g: setattr(g.ops[0], "type", 77), lambda g: setattr(g.ops[0], "type", -1),
                   lambda g: setattr(g.ops[0], "type", 2**31 - 1), lambda g: setattr(g.ops[0], "type", 0),
                   lambda g: g.ops[0].args.append(0), lambda g: g.ops[1].args.__setitem__(0, 3),
                   lambda g: g.ops[1].args.__setitem__(0, 2**32 - 1), lambda g: setattr(g.outputs[0], "value", 4),
                   lambda g: g.inputs[0].shape[0].CopyFrom(pb.Dim(size=-1)),
                   lambda g: g.inputs[0].shape[0].CopyFrom(pb.Dim(size=2**24 + 1)),
                   lambda g: g.inputs[0].shape[0].CopyFrom(pb.Dim(size=2**40)),
                   lambda g: g.inputs[0].shape.extend([pb.Dim(size=1)] * 3),
                   lambda g: setattr(g.inputs[0], "type", 99), lambda g: setattr(g.inputs[0], "type", int(T.F16)),
                   lambda g: setattr(g.inputs[0], "name", ""), lambda g: setattr(g.inputs[0], "name", "x" * 1000),
                   lambda g: g.ops[1].attrs.__setattr__("eps", float("nan"))]:
        g = graph()
        mutate(g)
        fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=g), IA)

    # a graph whose buffer is freed after registration: Compute refuses, nothing reads freed memory
    tmp = fz.ok("AllocBuffer", pb.AllocBufferRequest(size=128)).buffer_id
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=graph(buffer_id=tmp))).graph_id
    fz.ok("FreeBuffer", pb.BufferRequest(buffer_id=tmp))
    fz.refused("Compute", _compute(gid, x=np.ones((2, 8), np.float32)), FP)
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))
    # another session cannot compute (or release) this session's graph
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=graph())).graph_id
    fz.refused("Compute", _compute(gid, x=np.ones((2, 8), np.float32)), NF, session="other")
    fz.refused("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid), NF, session="other")
    # Compute arrays whose shape x type size overflows, or that lie about their bytes
    for arr in [pb.Array(type=0, shape=[0, 2**62, 2**62]), pb.Array(type=0, shape=[I64, I64, 0]),
                pb.Array(type=0, shape=[2, -8], data=b""), pb.Array(type=0, shape=[1] * 5, data=b"\0" * 4),
                pb.Array(type=0, shape=[2**61, 8], data=b"\0" * 64), pb.Array(type=0, shape=[2, 8], data=b"\0" * 63),
                pb.Array(type=99, shape=[2, 8], data=b"\0" * 64), pb.Array(type=int(T.Q8_0), shape=[2, 32]),
                pb.Array(type=0, shape=[0, 2**40]), pb.Array(type=0, shape=[2**25, 8])]:
        fz.refused("Compute", pb.ComputeRequest(graph_id=gid, inputs=[pb.NamedArray(name="x", array=arr)]), IA)
    fz.refused("Compute", _compute(gid, x=np.ones((2, 8), np.float32), y=np.ones(1, np.float32)), IA)
    fz.refused("Compute", pb.ComputeRequest(graph_id=gid, inputs=[
        pb.NamedArray(name="x", array=array_to_pb(np.ones((1, 8), np.float32)))] * 2), IA)
    fz.refused("Compute", pb.ComputeRequest(graph_id=gid, inputs=[
        pb.NamedArray(name=f"i{k}", array=array_to_pb(np.ones(1, np.float32))) for k in range(100)]), IA)
    fz.refused("Compute", _compute(gid, x=np.zeros((17 << 20, 1), np.float32)), RE)   # past the message limit
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))

    # ATTENTION: K/V caches that are not buffer tensors, or of the wrong type; cells outside the cache
    cache = fz.ok("AllocBuffer", pb.AllocBufferRequest(size=16 * 4 * 4 * 2)).buffer_id

    def attention_graph(k_cache: str = "tensor", cache_type: T = T.F32) -> pb.Graph:
        gb = GraphBuilder()
        q, k, v = gb.input("q", T.F32, ("n", 8)), gb.input("k", T.F32, ("n", 4)), gb.input("v", T.F32, ("n", 4))
        ints = [gb.input(nm, T.I32, (s,)) for nm, s in
                [("cells", "n"), ("tok_pos", "n"), ("tok_seq", "n"), ("kv_pos", "l"), ("kv_seq", "l")]]
        kc = gb.tensor(TensorRef(cache, 0, cache_type, (16, 4) if cache_type != T.Q8_0 else (2, 32)))
        vc = gb.tensor(TensorRef(cache, 256, T.F32, (16, 4)))
        kc = {"tensor": kc, "input": k, "op": gb.silu(k)}[k_cache]
        gb.output("o", gb.attention(q, k, v, kc, vc, *ints, n_head=2, n_head_kv=1, head_dim=4, scale=0.5))
        return gb.build()

    for kc, ct in [("input", T.F32), ("op", T.F32), ("tensor", T.Q8_0), ("tensor", T.I32)]:
        fz.refused("RegisterGraph", pb.RegisterGraphRequest(graph=attention_graph(kc, ct)), IA)
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=attention_graph())).graph_id

    def att_inputs(cells: list[int], n_cells: int = 4, n: int | None = None) -> pb.ComputeRequest:
        n = len(cells) if n is None else n
        return _compute(gid, q=np.ones((n, 8), np.float32), k=np.ones((n, 4), np.float32),
                        v=np.ones((n, 4), np.float32), cells=np.array(cells, np.int32),
                        tok_pos=np.arange(n, dtype=np.int32), tok_seq=np.zeros(n, np.int32),
                        kv_pos=np.arange(n_cells, dtype=np.int32), kv_seq=np.zeros(n_cells, np.int32))

    fz.ok("Compute", att_inputs([0, 1]))
    for cells, n_cells in [([16], 4), ([-1], 4), ([2**31 - 1], 4), ([-2**31], 4), ([0, 99], 4), ([0], 17), ([0], 1000)]:
        fz.refused("Compute", att_inputs(cells, n_cells), IA)
    fz.refused("Compute", att_inputs([0, 1], n=3), IA)      # cells shorter than the batch
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))

    # GET_ROWS with ids out of range, from a stored table and from an input table (llama.cpp#26825)
    gb = GraphBuilder()
    ids = gb.input("ids", T.I32, ("n",))
    table = gb.input("table", T.F32, ("r", 8))
    gb.output("s", gb.get_rows(gb.tensor(TensorRef(a, 0, T.F32, (4, 8))), ids))
    gb.output("q", gb.get_rows(gb.tensor(TensorRef(a, 128, T.Q8_0, (2, 32))), ids))
    gb.output("t", gb.get_rows(table, ids))
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
    fz.ok("Compute", _compute(gid, ids=np.array([0, 1], np.int32), table=np.ones((2, 8), np.float32)))
    for bad in [[2], [-1], [2**31 - 1], [-2**31], [0, 1, 4]]:
        fz.refused("Compute", _compute(gid, ids=np.array(bad, np.int32), table=np.ones((2, 8), np.float32)), IA)
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))
    for table_kind in ("stored", "input"):   # float ids
        gb = GraphBuilder()
        fids = gb.input("fids", T.F32, ("m",))
        table = gb.tensor(TensorRef(a, 0, T.F32, (4, 8))) if table_kind == "stored" else gb.input("t", T.F32, (4, 8))
        gb.output("f", gb.get_rows(table, fids))
        gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
        extra = {} if table_kind == "stored" else {"t": np.ones((4, 8), np.float32)}
        for f in [[0.0], [0.5], [float("nan")], [float("inf")], [-1.0], [1e30]]:
            fz.refused("Compute", _compute(gid, fids=np.array(f, np.float32), **extra), IA)
        fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))

    # huge symbol dims / outputs that would allocate far past the node's capacity: refused, not allocated
    def blowup(build, **inputs: np.ndarray) -> None:
        gb = GraphBuilder()
        gb.output("o", build(gb))
        gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
        fz.refused("Compute", _compute(gid, **inputs), RE, IA)
        fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))

    n = 1 << 15
    blowup(lambda gb: gb.add(gb.input("a", T.F32, ("n", 1)), gb.input("b", T.F32, (1, "m"))),
           a=np.zeros((n, 1), np.float32), b=np.zeros((1, n), np.float32))               # 4 GiB
    blowup(lambda gb: gb.mul(gb.input("a", T.F32, ("n", 1, 1)), gb.input("b", T.F32, ("m", "k"))),
           a=np.zeros((1 << 12, 1, 1), np.float32), b=np.zeros((1 << 12, 1 << 8), np.float32))   # 16 GiB
    blowup(lambda gb: gb.matmul(gb.input("x", T.F32, ("n", "k")), gb.input("w", T.F32, ("m", "k"))),
           x=np.zeros((n, 1), np.float32), w=np.zeros((n, 1), np.float32))               # 4 GiB
    blowup(lambda gb: gb.get_rows(gb.input("t", T.F32, ("r", "c")), gb.input("i", T.I32, ("n",))),
           t=np.zeros((1, 1 << 16), np.float32), i=np.zeros(1 << 14, np.int32))          # 4 GiB
    big = fz.ok("AllocBuffer", pb.AllocBufferRequest(size=(1 << 16) * 4)).buffer_id

    def big_attention(gb: GraphBuilder) -> Any:
        q, k, v = (gb.input(nm, T.F32, ("n", 1)) for nm in "qkv")
        cache_t = gb.tensor(TensorRef(big, 0, T.F32, (1 << 16, 1)))
        ints = [gb.input(nm, T.I32, (s,)) for nm, s in
                [("cells", "n"), ("tok_pos", "n"), ("tok_seq", "n"), ("kv_pos", "l"), ("kv_seq", "l")]]
        return gb.attention(q, k, v, cache_t, cache_t, *ints, n_head=1, n_head_kv=1, head_dim=1, scale=1.0)

    m = 1 << 13
    blowup(big_attention, q=np.zeros((m, 1), np.float32), k=np.zeros((m, 1), np.float32),
           v=np.zeros((m, 1), np.float32), cells=np.arange(m, dtype=np.int32), tok_pos=np.zeros(m, np.int32),
           tok_seq=np.zeros(m, np.int32), kv_pos=np.zeros(1 << 16, np.int32),
           kv_seq=np.zeros(1 << 16, np.int32))                                            # 3 x 2 GiB of scores
    # POOL loops over the sequences, each pass over every row: a million one-row sequences is refused
    n = 1 << 20
    blowup(lambda gb: gb.op(pb.POOL, gb.input("x", T.F32, ("n", 1)), gb.input("seq", T.I32, ("n",)), pooling=1),
           x=np.zeros((n, 1), np.float32), seq=np.arange(n, dtype=np.int32))
    # many values that each fit but must all be kept (outputs) together would not
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", "k"))
    for i in range(64):
        gb.output(f"o{i}", gb.add(x, x))
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
    fz.refused("Compute", _compute(gid, x=np.zeros((1 << 12, 1 << 10), np.float32)), RE)   # 64 x 16 MiB
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))
    # a long chain is fine: each intermediate is freed after its last reader
    gb = GraphBuilder()
    v = gb.input("x", T.F32, ("n", "k"))
    for _ in range(64):
        v = gb.add(v, v)
    gb.output("o", v)
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
    fz.ok("Compute", _compute(gid, x=np.zeros((1 << 10, 1 << 10), np.float32)))          # 64 x 4 MiB, 2 alive
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))
    grown = _vm_hwm_kib(fz.node.pid) - hwm0
    assert grown < 400 << 10, f"the node's peak memory grew by {grown >> 10} MiB answering refused requests"

    for bid in (a, cache, big):
        fz.ok("FreeBuffer", pb.BufferRequest(buffer_id=bid))
    fz.done.add("advisories")


# -- afterwards -------------------------------------------------------------------------------------
FUZZ_TESTS = {"hello", "get_memory", "buffers", "set_tensor", "set_tensor_from_cache", "get_tensor",
              "copy_tensor", "random_graphs", "plausible_graphs", "unknown_graphs", "advisories"}


def test_node_still_computes_after_fuzzing(fz):
    assert fz.node.alive()
    # no request of another session touched the witness session's buffer
    assert fz.ok("GetTensor", pb.GetTensorRequest(buffer_id=fz.witness_buf, size=256),
                 session="witness") == fz.witness_bytes
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    g = rng.standard_normal(16).astype(np.float32)
    buf = fz.ok("AllocBuffer", pb.AllocBufferRequest(size=w.nbytes + 64)).buffer_id
    fz.ok("SetTensor", _set(buf, 0, w.tobytes()))
    fz.ok("SetTensor", _set(buf, w.nbytes, g.tobytes()))
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 32))
    h = gb.matmul(x, gb.tensor(TensorRef(buf, 0, T.F32, (16, 32))))
    gb.output("y", gb.mul(gb.rms_norm(h, 1e-5), gb.tensor(TensorRef(buf, w.nbytes, T.F32, (16,)))))
    gid = fz.ok("RegisterGraph", pb.RegisterGraphRequest(graph=gb.build())).graph_id
    xs = rng.standard_normal((5, 32)).astype(np.float32)
    out = fz.ok("Compute", _compute(gid, x=xs))
    y = {o.name: array_from_pb(o.array) for o in out.outputs}["y"]
    ref = xs @ w.T
    ref = ref / np.sqrt(np.mean(ref * ref, axis=-1, keepdims=True) + 1e-5) * g
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    fz.ok("ReleaseGraph", pb.ReleaseGraphRequest(graph_id=gid))
    fz.ok("FreeBuffer", pb.BufferRequest(buffer_id=buf))
    # a fresh client still gets a session and the node reports its whole capacity
    mem = fz.ok("GetMemory", pb.GetMemoryRequest())
    assert mem.total_bytes == MEM_MIB << 20 and mem.free_bytes > mem.total_bytes - (1 << 20)
    assert "Traceback" not in fz.node.stderr_text()
    if FUZZ_TESTS <= fz.done:   # the whole module ran (not a -k selection)
        rpcs = {rpc for rpc, _ in fz.codes}
        assert rpcs >= set(pb.DESCRIPTOR.services_by_name["Backend"].methods_by_name), rpcs
        print(f"\nfuzz: {fz.count} requests; answers: "
              + ", ".join(f"{r}/{c}={k}" for (r, c), k in sorted(fz.codes.items())))
        assert fz.count >= MIN_TOTAL_REQUESTS, f"only {fz.count} requests were sent"

