"""Grammar-constrained sampling (frontend/sampling/constraint.py) on the synthetic byte-level
vocabulary: random logits, so everything valid comes from the mask. Both modes (check-then-mask,
mask-always) give grammar-valid output; bad grammars and schemas are GrammarErrors naming the
problem."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from llamarpc.frontend.model.tokenizer import Tokenizer
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.frontend.sampling.constraint import Grammar, GrammarError, ll_tokenizer
from llamarpc.frontend.sampling.sampler import Sampler
from synth import write_model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "color", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("constraint") / "synth.gguf"
    write_model(path)
    return Tokenizer.from_gguf(str(path))


def generate(tok: Tokenizer, grammar: Grammar, seed: int, n_max: int = 200) -> tuple[str, str]:
    """Sample from random logits under the grammar; (text, how it ended)."""
    rng = np.random.default_rng(seed)
    s = Sampler(SamplingParams(seed=seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, grammar=grammar),
                tok.n_vocab)
    out = []
    for _ in range(n_max):
        t = s.sample(rng.normal(0, 3, tok.n_vocab).astype(np.float32))
        if tok.is_eog(t):
            return tok.decode(out), "eos"
        out.append(t)
        if s.constraint.done:
            return tok.decode(out), "done"
    return tok.decode(out), "length"


@pytest.mark.parametrize("mode", ["check", "mask"])
def test_gbnf_alternatives(tok, mode):
    g = Grammar.from_gbnf('root ::= "yes" | "no"', ll_tokenizer(tok), mode)
    seen = set()
    for seed in range(6):
        text, how = generate(tok, g, seed)
        assert text in ("yes", "no") and how in ("eos", "done")
        seen.add(text)
    assert seen == {"yes", "no"}


@pytest.mark.parametrize("mode", ["check", "mask"])
def test_json_schema_validates(tok, mode):
    g = Grammar.from_json_schema(SCHEMA, ll_tokenizer(tok), mode)
    for seed in range(3):
        text, how = generate(tok, g, seed, 400)
        if how == "length":
            continue            # random logits may wander in a string; the grammar still held
        jsonschema.validate(json.loads(text), SCHEMA)


def test_check_mode_masks_only_when_needed(tok):
    """A grammar that allows almost everything: check-then-mask computes (nearly) no masks."""
    g = Grammar.from_gbnf('root ::= [^\\x00]*', ll_tokenizer(tok), "check")
    s = Sampler(SamplingParams(seed=1, temperature=1.0, grammar=g), tok.n_vocab)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, tok.n_vocab).astype(np.float32)
    logits[:3] = -50            # specials and non-ASCII bytes (half a UTF-8 character) unlikely
    logits[3 + 128:3 + 256] = -50
    for _ in range(20):
        s.sample(logits)
    assert s.constraint.n_masks <= 2


def test_bad_grammars(tok):
    v = ll_tokenizer(tok)
    with pytest.raises(GrammarError, match="foo"):
        Grammar.from_gbnf("root ::= foo", v)
    with pytest.raises(GrammarError, match="empty"):
        Grammar.from_gbnf("  ", v)
    with pytest.raises(GrammarError):
        Grammar.from_gbnf('root ::= "a" (', v)
    with pytest.raises(GrammarError, match="foo"):
        Grammar.from_json_schema({"type": "foo"}, v)
    with pytest.raises(GrammarError, match="JSON"):
        Grammar.from_json_schema("{not json", v)
    with pytest.raises(GrammarError):
        Grammar.from_json_schema([1, 2], v)


def test_control_tokens_never_text(tok):
    """<|im_start|> is a control token: a grammar for that literal text does not emit the token."""
    g = Grammar.from_gbnf('root ::= "<|im_start|>"', ll_tokenizer(tok), "mask")
    c = g.start()
    allowed = c.allowed(tok.n_vocab)
    assert not allowed[tok.token_to_id("<|im_start|>")]
    assert allowed[tok.token_to_id("<")]
