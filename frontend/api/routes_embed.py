"""Embeddings and rerank, as llama-server serves them (started with --embeddings / --reranking):
POST /v1/embeddings (OpenAI's shape), /embedding (llama-server's own: `--pooling none` gives every
token's vector), /v1/rerank with its aliases (Jina / Cohere shape).

Vectors are normalized as llama-server's common_embd_normalize does (`embd_normalize`: -1 none, 0
max-abs scaled to int16, 1 taxicab, 2 euclidean (the default), p > 2 a p-norm); per-token vectors
(pooling none) are returned as they are, as llama-server does. The work runs on the engine thread
(Engine.call), between generation steps.
"""
from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from llamarpc.proto.errors import BackendError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..engine.embed import EmbedError
from .checks import tokenize_off_loop
from .errors import APIError, bad_request, error_response
from .schemas import EmbeddingRequest, RerankRequest
from .state import ServerState

router = APIRouter()


def normalize(v: np.ndarray, mode: int) -> np.ndarray:
    """llama.cpp's common_embd_normalize."""
    x = v.astype(np.float64)
    if mode == -1:
        s = 1.0
    elif mode == 0:
        s = float(np.abs(x).max(initial=0.0)) / 32760.0
    elif mode == 2:
        s = float(np.sqrt(np.sum(x * x)))
    else:
        s = float(np.sum(np.abs(x) ** mode) ** (1.0 / mode))
    return (x * (1.0 / s if s > 0.0 else 0.0)).astype(np.float32)


def _state(request: Request) -> ServerState:
    st: ServerState = request.app.state.llamarpc
    if not st.ready:
        raise APIError(503, "Loading model", "unavailable_error")
    return st


def _embedder(st: ServerState):  # noqa: ANN202 - Embedder
    emb = getattr(st.engine, "embedder", None)
    if emb is None:
        raise APIError(501, "This server does not support embeddings. Start it with `--embeddings`",
                       "not_supported_error")
    return emb


async def _run(st: ServerState, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    assert st.engine is not None
    emb = _embedder(st)
    fut = st.engine.call(lambda eng: emb.run(eng, inputs))
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), st.settings.timeout)
    except EmbedError as e:
        raise bad_request(str(e)) from None
    except BackendError as e:
        raise APIError(503, str(e), "unavailable_error") from None
    except asyncio.TimeoutError:
        fut.cancel()
        raise APIError(503, "the engine did not answer in time", "unavailable_error") from None


async def _tokenized(st: ServerState, prompt: Any, what: str) -> list[list[int]]:
    assert st.model is not None and st.engine is not None
    if prompt is None:
        raise bad_request(what)
    if isinstance(prompt, str) and not prompt:
        raise bad_request("Input content cannot be empty")
    try:
        return await tokenize_off_loop(prompt, st.model.tokenizer, st.engine.n_ctx_slot)
    except APIError as e:
        if e.message == "the prompt is empty":
            raise bad_request("Input content cannot be empty") from None
        raise


@router.post("/v1/embeddings")
@router.post("/embeddings")
async def oai_embeddings(request: Request, r: EmbeddingRequest) -> Response:
    st = _state(request)
    emb = _embedder(st)
    fmt = r.encoding_format or "float"
    if emb.pooling == 0:
        raise bad_request("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
    norm = 2 if r.embd_normalize is None else r.embd_normalize
    prompts = await _tokenized(st, r.input if r.input is not None else r.content, "\"input\" must be provided")
    vecs = await _run(st, prompts)
    data = []
    for i, v in enumerate(vecs):
        n = normalize(v, norm)
        e: Any = base64.b64encode(n.astype("<f4").tobytes()).decode() if fmt == "base64" else n.tolist()
        data.append({"embedding": e, "index": i, "object": "embedding"})
    n_tok = sum(map(len, prompts))
    return JSONResponse({"model": r.model or st.settings.model_name, "object": "list",
                         "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}, "data": data})


@router.post("/embedding")
async def embedding(request: Request, r: EmbeddingRequest) -> Response:
    st = _state(request)
    emb = _embedder(st)
    norm = 2 if r.embd_normalize is None else r.embd_normalize
    prompt = r.input if r.input is not None else r.content
    prompts = await _tokenized(st, prompt, "\"input\" or \"content\" must be provided")
    vecs = await _run(st, prompts)
    out = []
    for i, v in enumerate(vecs):
        rows = [r.tolist() for r in v] if emb.pooling == 0 else [normalize(v, norm).tolist()]
        out.append({"index": i, "embedding": rows})
    return JSONResponse(out)


def rerank_tokens(tok, query: list[int], doc: list[int]) -> list[int]:  # noqa: ANN001 - Tokenizer
    """llama-server's format_rerank: [BOS] query [EOS] [SEP] doc [EOS], each as the model adds them."""
    eos = tok.eos_id if tok.eos_id is not None else tok.special_ids.get("sep")
    sep = tok.special_ids.get("sep")
    add_sep = bool(getattr(tok, "add_sep", False))
    out = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    out += query
    if tok.add_eos and eos is not None:
        out.append(eos)
    if add_sep and sep is not None:
        out.append(sep)
    out += doc
    if tok.add_eos and eos is not None:
        out.append(eos)
    return out


@router.post("/v1/rerank")
@router.post("/rerank")
@router.post("/reranking")
@router.post("/v1/reranking")
async def rerank(request: Request, r: RerankRequest) -> Response:
    st = _state(request)
    emb = getattr(st.engine, "embedder", None)
    if emb is None or emb.pooling != 4:
        return error_response(501, "This server does not support reranking. Start it with `--reranking`",
                              "not_supported_error")
    assert st.model is not None and st.engine is not None
    query = r.query
    if query is None:
        raise bad_request("\"query\" must be provided")
    docs = r.documents if r.documents is not None else r.texts
    if docs is None:
        raise bad_request("\"documents\" must be provided")
    if not docs:
        raise bad_request("\"documents\" must be a non-empty array")
    texts = [d.get("text") if isinstance(d, dict) else d for d in docs]
    if not all(isinstance(t, str) for t in texts):
        raise bad_request("each of \"documents\" must be a string (or an object with a string \"text\")")
    top_n = len(texts) if r.top_n is None else r.top_n
    tok = st.model.tokenizer
    n_bytes = len(query.encode()) + sum(len(t.encode()) for t in texts)
    if n_bytes > 64 * st.engine.n_ctx_slot * max(1, len(texts)):
        raise bad_request("the request is too long for the context")

    def encode() -> list[list[int]]:
        q = tok.encode(query, add_special=False, parse_special=True)
        return [rerank_tokens(tok, q, tok.encode(t, add_special=False, parse_special=True)) for t in texts]

    prompts = await run_in_threadpool(encode)
    scores = [float(v[0]) for v in await _run(st, prompts)]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]
    with_text = r.return_text_documents is True
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": texts[i]}} if with_text else {})}
               for i in order]
    n_tok = sum(map(len, prompts))
    return JSONResponse({"model": r.model or st.settings.model_name, "object": "list",
                         "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}, "results": results})
