"""POST /infill: fill-in-the-middle as llama-server's format_infill builds it, then a /completion.

`input_prefix`, `input_suffix`, `prompt` (appended to the prefix) and `input_extra` ([{filename,
text}], repo-level context: <|fim_repo|> "myproject\\n", then per chunk <|file_sep|> filename "\\n"
text, or a plain "--- snippet ---" separator when the model has no file separator). The prefix is
cut to 3/4 of n_batch from its end, the suffix to what is left of a quarter; the extra context
keeps its end, within n_ctx - n_batch - 2 n_predict. A model without FIM prefix/suffix/middle
tokens is llama-server's 501 not_supported_error.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .checks import pick_fields
from .errors import APIError, bad_request
from .formats import native_final, native_partial
from .params import check_context, task_params
from .routes_native import _collect, stream_events
from .schemas import InfillRequest
from .state import ServerState
from .stream import Submission

router = APIRouter()

SNIPPET = "\n\n--- snippet ---\n\n"


def _extra(raw: Any) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("\"input_extra\" must be an array of {\"filename\": string, \"text\": string}")
    out = []
    for c in raw:
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise bad_request("extra_context chunk must contain a \"text\" field with a string value")
        name = c.get("filename", "")
        if not isinstance(name, str):
            raise bad_request("extra_context chunk's \"filename\" field must be a string")
        out.append((name, c["text"]))
    return out


def format_infill(tok, prefix: str, suffix: str, prompt: str, extra: list[tuple[str, str]],  # noqa: ANN001
                  n_batch: int, n_ctx: int, n_predict: int) -> list[int]:
    """llama-server's format_infill (tools/server/utils.hpp), PSM order."""
    ids = tok.special_ids
    enc = lambda s: tok.encode(s, add_special=False, parse_special=False)  # noqa: E731
    extra_t: list[int] = []
    if ids.get("fim_rep") is not None:
        extra_t += [ids["fim_rep"], *enc("myproject\n")]
    for name, text in extra:
        if ids.get("fim_sep") is not None:
            extra_t += [ids["fim_sep"], *enc(name + "\n")]
        else:
            extra_t += enc(SNIPPET)
        extra_t += enc(text)
    if ids.get("fim_sep") is not None:
        extra_t += [ids["fim_sep"], *enc("filename\n")]
    t_pre, t_suf, t_prompt = enc(prefix), enc(suffix), enc(prompt)
    n_pre = min(len(t_pre), 3 * (n_batch // 4))
    n_suf = min(len(t_suf), max(0, n_batch // 4 - (2 + len(t_prompt))))
    t_pre = [ids["fim_pre"], *t_pre[len(t_pre) - n_pre:], *t_prompt]
    t_suf = [ids["fim_suf"], *t_suf[:n_suf]]
    out = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + t_pre
    n_extra = min(max(0, n_ctx - n_batch - 2 * max(n_predict, 0)), len(extra_t))
    out = extra_t[len(extra_t) - n_extra:] + out + t_suf + [ids["fim_mid"]]
    return out


@router.post("/infill")
async def infill(request: Request, r: InfillRequest) -> Response:
    st: ServerState = request.app.state.llamarpc
    if not st.ready:
        raise APIError(503, "Loading model", "unavailable_error")
    assert st.model is not None and st.engine is not None
    tok = st.model.tokenizer
    if any(tok.special_ids.get(k) is None for k in ("fim_pre", "fim_suf", "fim_mid")):
        raise APIError(501, "Infill is not supported by this model: prefix, suffix or middle token is missing",
                       "not_supported_error")
    texts = {"input_prefix": r.input_prefix or "", "input_suffix": r.input_suffix or "", "prompt": r.prompt or ""}
    extra = _extra(r.input_extra)
    if sum(len(t.encode()) for t in (*texts.values(), *(x for c in extra for x in c))) > 64 * st.engine.n_ctx:
        raise bad_request("the request exceeds the available context size")
    params = task_params(r, st)
    fields = r.response_fields
    pick_fields({}, fields)
    prompt = await run_in_threadpool(format_infill, tok, texts["input_prefix"], texts["input_suffix"], texts["prompt"],
                                     extra, st.engine.config.n_batch, st.engine.n_ctx_slot, params.n_predict)
    check_context([prompt], params, st.engine.n_ctx_slot)
    sub = Submission(st, request, [prompt], params)
    sub.start()
    n_slot = st.engine.n_ctx_slot

    def final(f: FinalEvent, stream: bool) -> dict:
        return pick_fields(native_final(f, n_slot, stream, tok.decode(f.prompt)), fields)

    if not params.stream:
        return JSONResponse(final((await _collect(sub))[0], False))

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        return [native_partial(ev, params.post_sampling_probs) if isinstance(ev, PartialEvent) else final(ev, True)]

    return await stream_events(sub, fmt)
