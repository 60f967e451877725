"""Grammar-constrained sampling through llguidance (GBNF in llama.cpp's dialect, JSON schema,
Lark, regex), the way llama.cpp applies a grammar: before the sampler chain.

`Grammar` is a compiled, validated grammar for one vocabulary (built by the API from a request's
`grammar` / `json_schema` / `response_format`; a bad one is a `GrammarError`, a ValueError, which
the API answers with a 400 naming the problem). `Constraint` is one request's parser state: the
Sampler asks it whether the token the chain drew is allowed and, only when it is not, masks the
logits and runs the chain again (llama.cpp's common_sampler_sample without grammar_first: "check
then mask"); mode "mask" masks every step instead, computing the next mask on a worker thread
right after a token is accepted (llguidance drops the GIL), i.e. while the nodes compute the next
step. `scripts/bench_constraint.py` measures both.

The vocabulary handed to llguidance is the model's token pieces, control tokens marked with a
0xff prefix as llguidance's own llama.cpp adapter does, so a grammar can never emit them as text.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import weakref
from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer

MODES = ("check", "mask")
_JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_vocabs: weakref.WeakKeyDictionary[Any, dict[int, llg.LLTokenizer]] = weakref.WeakKeyDictionary()
_vocab_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


class GrammarError(ValueError):
    """The grammar or schema cannot be used (the message says why)."""


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamarpc-grammar")
    return _pool


class _Wrapper:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tok: Tokenizer, n_vocab: int) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        pieces = []
        special = []
        for i in range(tok.n_vocab):
            piece = tok.token_to_piece(i)
            if tok.is_control(i):
                piece = b"\xff" + piece
                special.append(i)
            pieces.append(piece)
        pieces += [b""] * max(0, n_vocab - len(pieces))
        self.tokens = pieces
        self.special_token_ids = special

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


def ll_tokenizer(tok: Tokenizer, n_vocab: int | None = None) -> llg.LLTokenizer:
    """llguidance's view of a vocabulary (built once per tokenizer and logits size, ~0.3 s for 49k
    tokens). End-of-generation tokens are its EOS set."""
    n = max(n_vocab or tok.n_vocab, tok.n_vocab)
    with _vocab_lock:
        per = _vocabs.setdefault(tok, {})
        hit = per.get(n)
        if hit is None:
            eos = sorted(tok.eog_ids) or ([tok.eos_id] if tok.eos_id is not None else None)
            hit = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper(tok, n)), n_vocab=n, eos_token=eos)
            per[n] = hit
    return hit


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A grammar checked against one vocabulary: `kind` and `source` say what the request gave
    (for /props and /slots), `spec` is llguidance's grammar."""
    kind: str                          # "gbnf" (or Lark), "json_schema", "regex"
    source: str
    spec: str
    vocab: llg.LLTokenizer = dataclasses.field(compare=False, repr=False)
    mode: str = "check"

    @classmethod
    def _checked(cls, kind: str, source: str, spec: str, vocab: llg.LLTokenizer, mode: str) -> Grammar:
        if mode not in MODES:
            raise ValueError(f"grammar mode must be one of {MODES}, got {mode!r}")
        msg = llg.LLMatcher.validate_grammar(spec, vocab)
        if msg and not msg.startswith("WARNING"):
            raise GrammarError(msg)
        return cls(kind, source, spec, vocab, mode)

    @classmethod
    def from_gbnf(cls, text: str, vocab: llg.LLTokenizer, mode: str = "check") -> Grammar:
        """llama.cpp's GBNF (root rule `root`); Lark text and `%llguidance` grammars pass through."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar is empty")
        try:
            spec = llg.grammar_from("grammar", text)
        except ValueError as e:
            raise GrammarError(str(e).replace("Lark", "llguidance")) from None
        return cls._checked("gbnf", text, spec, vocab, mode)

    @classmethod
    def from_json_schema(cls, schema: Any, vocab: llg.LLTokenizer, mode: str = "check") -> Grammar:
        """A JSON schema (an object or true/false); the output is compact JSON with ', ' and ': '."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("a JSON schema must be an object or a boolean")
        try:
            spec = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return cls._checked("json_schema", json.dumps(schema), spec, vocab, mode)

    @classmethod
    def from_lark(cls, text: str, vocab: llg.LLTokenizer, mode: str = "check") -> Grammar:
        return cls._checked("lark", text, llg.LLMatcher.grammar_from_lark(text), vocab, mode)

    def start(self) -> Constraint:
        return Constraint(self)


class Constraint:
    """One request's grammar state (llguidance's LLMatcher) and its token mask."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.mode = grammar.mode
        self.matcher = llg.LLMatcher(grammar.vocab, grammar.spec, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        n = grammar.vocab.vocab_size
        self.n_vocab = n
        self._bits = np.full((n + 31) // 32, -1, dtype=np.int32)
        self._fresh = False
        self._pending: concurrent.futures.Future[None] | None = None
        self._stopped = self.matcher.is_stopped()
        self.n_masks = 0              # masks computed (for the benchmark and the tests)
        if self.mode == "mask":
            self._prefetch()

    # -- the parser ------------------------------------------------------------------------------
    def allows(self, token: int) -> bool:
        self._wait()
        return self.matcher.validate_tokens([int(token)]) == 1

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False if the grammar refuses it (the matcher is then in
        its error state and `done`)."""
        self._wait()
        ok = self.matcher.consume_token(int(token))
        self._fresh = False
        self._stopped = self.matcher.is_stopped()
        if ok and self.mode == "mask" and not self._stopped:
            self._prefetch()       # the matcher is the worker's until the next _wait
        return ok

    @property
    def done(self) -> bool:
        """Nothing but end-of-generation can follow (the grammar is complete, or broken)."""
        return self._stopped

    @property
    def accepting(self) -> bool:
        self._wait()
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        self._wait()
        return self.matcher.get_error() if self.matcher.is_error() else ""

    # -- the mask --------------------------------------------------------------------------------
    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self.n_masks += 1

    def _prefetch(self) -> None:
        self._pending = _worker().submit(self._fill)

    def _wait(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()
            self._fresh = True

    def allowed(self, n: int) -> np.ndarray:
        """Bool mask of the allowed tokens among the first n ids (logits may be padded)."""
        self._wait()
        if not self._fresh:
            self._fill()
            self._fresh = True
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        if n <= bits.size:
            return bits[:n].astype(bool)
        return np.concatenate([bits.astype(bool), np.zeros(n - bits.size, bool)])

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of the tokens the grammar forbids to -inf, in place."""
        logits[~self.allowed(logits.size)] = -np.inf
