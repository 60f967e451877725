"""Tool calls in the OpenAI shape: `tools`, `tool_choice` (auto, none, required, a named function),
`parallel_tool_calls`, the model's output parsed into `message.tool_calls`.

Two formats, as llama.cpp's --jinja chooses them:
- native: the chat template handles `tools` itself (its source mentions them); the tools are passed
  to it as Hugging Face passes them, and the output is parsed in the Hermes style the common
  templates use (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`). With `required` or a
  named function the calls are grammar-constrained to the tools' schemas.
- generic (every other template, e.g. SmolLM2's): llama.cpp's generic JSON format. The tools and
  the reply format are described in the system prompt, the reply is always constrained to JSON
  `{"tool_call": {"name", "arguments"}}` / `{"tool_calls": [...]}` (parallel) or, with `auto`,
  `{"response": "..."}`; assistant tool calls and `tool` results in the history are rendered as
  that JSON (llama.cpp's minja polyfills).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import secrets
import string
from typing import Any

from .errors import bad_request

_ALNUM = string.ascii_letters + string.digits
_JSON_X = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
GENERIC_INSTRUCTIONS = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with "
                        "`response` reply to the user's request")


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclasses.dataclass
class ToolSpec:
    tools: list[dict]                   # [{"type": "function", "function": {name, description, parameters}}]
    choice: str                         # "auto" | "required" | "named"
    name: str = ""                      # the function of a named choice
    parallel: bool = False
    native: bool = False                # the chat template renders `tools` itself

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def functions(self) -> list[dict]:
        fns = [t["function"] for t in self.tools]
        return [f for f in fns if f["name"] == self.name] if self.choice == "named" else fns


def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def parse_tools(body: dict[str, Any], template: str | None) -> ToolSpec | None:
    """The request's tools and tool_choice, checked; None when no tool may be called."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' requires 'tools'")
        return None
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append({"type": "function", "function": {**fn, "parameters": params}})
    name = ""
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if name not in [t["function"]["name"] for t in tools]:
            raise bad_request(f"'tool_choice' names the function {name!r}, which is not in 'tools'")
        choice = "named"
    elif choice not in ("auto", "none", "required"):
        raise bad_request("'tool_choice' must be \"auto\", \"none\", \"required\" or a named function")
    if choice == "none":
        return None
    parallel = body.get("parallel_tool_calls", False)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean")
    return ToolSpec(tools, choice, name, parallel and choice != "named", template_supports_tools(template))


# -- the prompt ---------------------------------------------------------------------------------------
def _args_obj(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _check_calls(i: int, calls: Any) -> list[dict]:
    if not isinstance(calls, list):
        raise bad_request(f"messages[{i}].tool_calls must be an array")
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"messages[{i}].tool_calls entries must be {{\"function\": {{\"name\", \"arguments\"}}}}")
    return calls


def prepare_messages(messages: list[dict], spec: ToolSpec | None, template: str | None) -> list[dict]:
    """The history as the template gets it: tool calls' arguments as objects; for a template
    without tool support, calls and results as the generic JSON, and the tools described in the
    system prompt."""
    native = template_supports_tools(template)
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = _check_calls(i, m["tool_calls"])
            objs = [{"name": c["function"]["name"], "arguments": _args_obj(c["function"].get("arguments", {})),
                     **({"id": c["id"]} if c.get("id") else {})} for c in calls]
            if native:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": o["arguments"]}}
                                   for c, o in zip(calls, objs, strict=True)]
            else:
                body = {"tool_calls": objs} if len(objs) > 1 else {"tool_call": objs[0]}
                m["content"] = ((m.get("content") or "") + "\n" if m.get("content") else "") + json.dumps(body)
                del m["tool_calls"]
        if m["role"] == "tool" and not native:
            resp = {"tool": m.get("name", ""), "content": m["content"]}
            if m.get("tool_call_id"):
                resp["tool_call_id"] = m["tool_call_id"]
            m = {"role": "user", "content": json.dumps({"tool_response": resp})}
        out.append(m)
    if spec is not None and not spec.native:
        text = ("You can call any of the following tools to satisfy the user's requests: "
                + json.dumps([t["function"] for t in spec.tools], indent=2) + "\n\n" + GENERIC_INSTRUCTIONS)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_tools(spec: ToolSpec | None) -> dict[str, Any]:
    """Extra template variables: `tools` for a template that renders them."""
    return {"tools": copy.deepcopy(spec.tools)} if spec is not None and spec.native else {}


# -- the grammar --------------------------------------------------------------------------------------
def _call_schema(fn: dict, args_key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key], "additionalProperties": False}


def _one_of_calls(spec: ToolSpec) -> dict:
    calls = [_call_schema(f) for f in spec.functions()]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def generic_schema(spec: ToolSpec) -> dict:
    """llama.cpp's generic tool-call JSON schema."""
    call = _one_of_calls(spec)
    if spec.parallel:
        calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                 "required": ["tool_calls"], "additionalProperties": False}
    else:
        calls = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                 "additionalProperties": False}
    if spec.forced:
        return calls
    return {"anyOf": [calls, {"type": "object", "properties": {"response": {"type": "string"}},
                              "required": ["response"], "additionalProperties": False}]}


def hermes_lark(spec: ToolSpec) -> str:
    """Lark for `<tool_call>{json}</tool_call>` (one, or several when parallel)."""
    schema = {**_one_of_calls(spec), "x-guidance": _JSON_X}
    rep = "+" if spec.parallel else ""
    return (f"start: call{rep}\ncall: \"<tool_call>\\n\" obj \"\\n</tool_call>\" \"\\n\"?\n"
            f"obj: %json {json.dumps(schema)}\n")


# -- the output ---------------------------------------------------------------------------------------
def _calls_json(objs: list[Any]) -> list[dict]:
    out = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            continue
        args = o.get("arguments", o.get("parameters", {}))
        out.append({"id": call_id(), "type": "function",      # fresh ids: a model may copy old ones
                    "function": {"name": o["name"],
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


def parse_output(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from the generated text; text that does not parse stays content."""
    if not spec.native:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if isinstance(obj, dict):
            if "tool_calls" in obj and isinstance(obj["tool_calls"], list):
                return None, _calls_json(obj["tool_calls"])
            if "tool_call" in obj:
                return None, _calls_json([obj["tool_call"]])
            if isinstance(obj.get("response"), str):
                return obj["response"], []
        return text, []
    objs = []
    for m in _HERMES.finditer(text):
        try:
            objs.append(json.loads(m.group(1)))
        except json.JSONDecodeError:
            continue
    calls = _calls_json(objs)
    if not calls:
        return text, []
    rest = _HERMES.sub("", text).strip()
    return rest or None, calls


# -- the reply ----------------------------------------------------------------------------------------
def finish(stop_finish: str, calls: list[dict]) -> str:
    return "tool_calls" if calls and stop_finish != "length" else stop_finish


def shape_reply(reply: dict, spec: ToolSpec) -> dict:
    """A chat.completion with the tool calls parsed out of choices[0].message.content."""
    choice = reply["choices"][0]
    content, calls = parse_output(choice["message"]["content"] or "", spec)
    choice["message"]["content"] = content
    if calls:
        choice["message"]["tool_calls"] = calls
    choice["finish_reason"] = finish(choice["finish_reason"], calls)
    return reply


def stream_deltas(text: str, spec: ToolSpec) -> tuple[list[dict], list[dict]]:
    """The deltas a stream sends for the whole output once it is complete (the output is held
    back until it parses): (content deltas, tool_call deltas: one with id, type and name, then
    one with the arguments, per call), and the calls."""
    content, calls = parse_output(text, spec)
    deltas: list[dict] = []
    if content:
        deltas.append({"content": content})
    for i, c in enumerate(calls):
        deltas.append({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                       "function": {"name": c["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})
    return deltas, calls
