"""The request bodies as pydantic models: one place per endpoint family, read by FastAPI (so
`/docs` and `/openapi.json` describe the real API) and validated before a handler runs.

Lenient where llama-server is lenient: `null` is the same as absent, numbers may come as strings
("0.5", "40"), unknown fields are kept (`model_extra`) and ignored. Strict where it is strict: a
boolean is not a number, an integer field refuses 1.5, NaN and infinities are refused, an array
stays an array. A validation error is a 400 in llama.cpp's error shape (`app.py` formats it with
`validation_message`). Ranges the engine needs (top_k >= 0, mirostat 0..2, ...) are declared here,
so the handler code gets values it can use; rules that depend on the server (the slot count, the
vocabulary) stay in `params.py`.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from .errors import bad_request

MAX_DRAFT = 256         # the most draft tokens a request may ask for per step (speculative.n_max)
MAX_N_PROBS = 100       # alternatives reported per token, at most (the whole vocabulary was 234 MB for 50 tokens)


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Num = Annotated[float, BeforeValidator(_not_bool)]
Flag = Annotated[bool, Strict()]        # true/false only: 1 or "yes" is a mistake worth a 400


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _json_text(cls, v: Any) -> Any:
        """A body sent without `Content-Type: application/json` (curl -d sends a form type) reaches
        the model as bytes; llama-server reads it as JSON whatever the type says, and so do we."""
        if isinstance(v, (bytes, bytearray)):
            try:
                return json.loads(v)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"Invalid JSON in the request body: {e}") from None
        return v

    def fields(self) -> dict[str, Any]:
        """The fields the client sent (extras included, JSON names), after validation: the body as a dict."""
        return self.model_dump(exclude_unset=True, by_alias=True)


M = TypeVar("M", bound=Lenient)


def _seed(v: Any) -> Any:
    """llama.cpp takes any 64-bit integer and keeps it modulo 2^32 (uint32); -1 / 0xFFFFFFFF is random."""
    if v is None:
        return None
    v = _not_bool(v)
    if isinstance(v, str):
        v = int(v.strip())
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("must be an integer")
        v = int(v)
    if not isinstance(v, int):
        raise ValueError("must be an integer")
    if not -(2**63) <= v < 2**64:
        raise ValueError(f"{v} is out of range: llama.cpp takes a 64-bit integer and keeps it modulo 2^32 "
                         "(-1 or 4294967295 = random)")
    v &= 0xFFFFFFFF
    return -1 if v == 0xFFFFFFFF else v


def _cap_probs(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v > MAX_N_PROBS:
        return MAX_N_PROBS
    return v


class SamplingFields(Lenient):
    """The sampler chain's settings, with llama.cpp's names; absent means the server's default."""
    temperature: Num | None = None
    dynatemp_range: Num | None = None
    dynatemp_exponent: Num | None = None
    top_k: Int | None = Field(None, ge=0)
    top_p: Num | None = None
    min_p: Num | None = None
    typical_p: Num | None = None
    top_n_sigma: Num | None = None
    xtc_probability: Num | None = None
    xtc_threshold: Num | None = None
    repeat_last_n: Int | None = Field(None, ge=-1)
    repeat_penalty: Num | None = None
    presence_penalty: Num | None = None
    frequency_penalty: Num | None = None
    dry_multiplier: Num | None = None
    dry_base: Num | None = None
    dry_allowed_length: Int | None = Field(None, ge=0)
    dry_penalty_last_n: Int | None = Field(None, ge=-1)
    dry_sequence_breakers: list[str] | None = Field(None, min_length=1)
    mirostat: Int | None = Field(None, ge=0, le=2)
    mirostat_tau: Num | None = None
    mirostat_eta: Num | None = None
    min_keep: Int | None = Field(None, ge=0)
    samplers: list[str] | str | None = None
    logit_bias: list[Any] | dict[str, Any] | None = None
    seed: Annotated[int | None, BeforeValidator(_seed)] = None


class CompletionOptions(SamplingFields):
    """What every generating endpoint reads (/completion, /v1/completions, chat, infill)."""
    n_predict: Int | None = Field(None, ge=-1)
    max_tokens: Int | None = Field(None, ge=-1)
    max_completion_tokens: Int | None = Field(None, ge=-1)
    n_probs: Annotated[Int | None, BeforeValidator(_cap_probs)] = Field(None, ge=0)
    n: Int | None = Field(None, ge=1)
    n_cmpl: Int | None = Field(None, ge=1)
    stop: list[str] | str | None = None
    stop_regex: str | None = None
    id_slot: Int | None = Field(None, ge=-1)
    ignore_eos: Flag | None = None
    cache_prompt: Flag | None = None
    post_sampling_probs: Flag | None = None
    return_tokens: Flag | None = None
    stream: Flag | None = None
    timings_per_token: Flag | None = None
    n_keep: Int | None = Field(None, ge=-1)
    n_discard: Int | None = Field(None, ge=0)     # context shift: tokens dropped after n_keep (0: half the rest)
    grammar: str | None = None
    json_schema: dict[str, Any] | bool | None = None
    model: str | None = None
    response_fields: list[str] | None = None
    lora: list[Any] | None = None       # [{"id": adapter id, "scale": s}]: this request's LoRA scales
    # speculative decoding (with -md / --spec-type), llama-server's dotted names
    spec_n_max: Int | None = Field(None, alias="speculative.n_max", ge=0, le=MAX_DRAFT)
    spec_n_min: Int | None = Field(None, alias="speculative.n_min", ge=0)
    spec_p_min: Num | None = Field(None, alias="speculative.p_min", ge=0.0, le=1.0)


def _prompt_object(p: Any) -> Any:
    """A JSON object prompt ({"prompt_string": ...}) read as its text, as llama-server reads it."""
    if not isinstance(p, dict):
        return p
    if p.get("multimodal_data"):
        raise ValueError("this server has no multimodal support ('multimodal_data')")
    text = p.get("prompt_string")
    if not isinstance(text, str):
        raise ValueError("a JSON object prompt must have a string 'prompt_string'")
    return text


class CompletionRequest(CompletionOptions):
    """POST /completion and /v1/completions. `prompt`: "text", [ids], [ids and "text" mixed], an
    object {"prompt_string": ...}, or an array of those (several prompts)."""
    prompt: Any = None
    logprobs: Flag | Annotated[Int, Field(ge=0, le=20)] | None = None     # OpenAI's legacy top-N, 0..20
    return_progress: Flag | None = None
    echo: Flag | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return _prompt_object(v)
        if isinstance(v, list) and any(isinstance(x, dict) for x in v):
            return [_prompt_object(x) for x in v]
        return v


class TextPart(Lenient):
    type: str = "text"
    text: str | None = None


class ChatMessage(Lenient):
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Flag | None = None


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: dict[str, Any]


class JSONSchemaFormat(Lenient):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: Flag | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")


class StreamOptions(Lenient):
    include_usage: Flag | None = None


class ChatFields(Lenient):
    """What renders a conversation through the chat template (/v1/chat/completions, /apply-template)."""
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | str | None = None
    add_generation_prompt: Flag | None = None
    continue_final_message: Flag | Literal["content", "reasoning_content"] | None = None
    reasoning_format: str | None = None         # none | deepseek | auto (chat_request.py checks the name)
    reasoning_effort: str | None = None         # "none" renders with enable_thinking=false


class ChatRequest(CompletionOptions, ChatFields):
    """POST /v1/chat/completions."""
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Flag | None = None
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None
    logprobs: Flag | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)


class ApplyTemplateRequest(ChatFields):
    """POST /apply-template."""


class TokenizeRequest(Lenient):
    content: str
    add_special: Flag | None = None
    parse_special: Flag | None = None
    with_pieces: Flag | None = None


class DetokenizeRequest(Lenient):
    tokens: list[Int] = []


class InfillRequest(CompletionOptions):
    """POST /infill: the code before and after the hole, and other files of the repository."""
    input_prefix: str | None = None
    input_suffix: str | None = None
    input_extra: list[dict[str, Any]] | None = None
    prompt: str | None = None
    return_progress: Flag | None = None


class EmbeddingRequest(Lenient):
    """POST /v1/embeddings (OpenAI: `input`) and /embedding(s) (llama.cpp: `content`)."""
    input: Any = None
    content: Any = None
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    embd_normalize: Int | None = None


class RerankRequest(Lenient):
    """POST /v1/rerank and its aliases (Jina/Cohere shape)."""
    query: str | None = None
    documents: list[str | dict[str, Any]] | None = None
    texts: list[str | dict[str, Any]] | None = None
    top_n: Int | None = Field(None, ge=0)
    return_text_documents: Flag | None = None
    model: str | None = None


class SlotActionRequest(Lenient):
    """POST /slots/{id}?action=save|restore (erase takes no body): a plain file name in --slot-save-path."""
    filename: str | None = None


class ResponsesRequest(Lenient):
    """POST /v1/responses (OpenAI Responses). The items of `input`, `text.format` and `tools` are
    read by routes_responses.py, which turns the body into a chat body (validated as ChatRequest)."""
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Flag | None = None
    temperature: Num | None = None
    top_p: Num | None = None
    stream: Flag | None = None
    model: str | None = None
    metadata: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None


class MessagesRequest(Lenient):
    """POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages); `max_tokens` is
    required by /v1/messages only (routes_messages.py says so in Anthropic's words)."""
    messages: list[Any] = Field(min_length=1)
    system: str | list[Any] | None = None
    max_tokens: Int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    temperature: Num | None = None
    top_p: Num | None = None
    top_k: Int | None = Field(None, ge=0)
    stream: Flag | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    model: str | None = None


def validated(model: type[M], data: dict[str, Any]) -> M:
    """A body built on the server (Responses/Messages -> chat) checked as a client's would be."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise bad_request(validation_message(list(e.errors()))) from None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line: "'top_k': Input should be greater than or equal to 0"."""
    out = []
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # a union reports each branch ('messages.0.content.str'); the field's path is what the client wrote
        path = ".".join(x for x in loc if not (x in _TYPE_BRANCHES or x.startswith(("function-", "list["))))
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            out.append(f"Invalid JSON in the request body: {e.get('ctx', {}).get('error', msg)}")
        elif e.get("type") == "missing" and not path:
            out.append("The request body must be a JSON object")
        elif e.get("type") == "model_attributes_type" and not path:
            out.append("The request body must be a JSON object")
        else:
            out.append(f"'{path}': {msg}" if path else msg)
    more = len(errors) - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


_TYPE_BRANCHES = frozenset({"str", "int", "float", "bool", "list", "dict", "constrained-int", "constrained-float",
                            "TextPart", "NamedToolChoice", "literal['auto','none','required']"})
