"""The logits transforms (penalties, bias, bitmask) against their definitions, and the
grammar engine's masks on Llama 3's real vocabulary and the demo's."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from helpers import llama3_tokenizer_path, sentencepiece_32k_path
from llama.demo import TEXT_PATH, train_tokenizer
from llama.logits_processing import (LogitsInputs, LogitsParams, LogitsProcessor, apply_bitmask, penalize,
                                     unpack_bitmask)
from llama.structured import GrammarError, Matcher, json_schema_grammar, regex_grammar, spells_any_text
from llama.tokenizer import Tokenizer

VOCAB = 70  # not a multiple of 32: the bitmask's last word is partial


@pytest.fixture(scope="module")
def llama3_tokenizer() -> Tokenizer:
    return Tokenizer(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Tokenizer:
    """The demo's: 512 sentencepiece pieces, half of them bytes."""
    path = tmp_path_factory.mktemp("demo_tokenizer") / "tokenizer.model"
    path.write_bytes(train_tokenizer(TEXT_PATH.read_text()))
    return Tokenizer(path)


def process_logits(logits: torch.Tensor, inputs: LogitsInputs) -> torch.Tensor:
    """What the engine's sampler draws from: penalized, biased, then masked."""
    return apply_bitmask(penalize(logits, inputs), inputs.bitmask)


def dense_definition(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: float,
                     frequency: float, repetition: float) -> torch.Tensor:
    """The penalties over the whole vocabulary, as their definitions read."""
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    return logits - counts * frequency - (counts > 0).float() * presence


def generate_into(processor: LogitsProcessor, slot: int, tokens: list[int]) -> torch.Tensor:
    """Feed `tokens` to the slot as if sampled; their counts over the vocabulary."""
    counts = torch.zeros(VOCAB)
    for token in tokens:
        processor.accept({slot: token})
        counts[token] += 1
    return counts


def test_frequency_and_presence_penalties_follow_openai_definition():
    processor = LogitsProcessor(slots=3, vocab=VOCAB, device=torch.device("cpu"))
    processor.admit(0, [3, 4], frozenset(), LogitsParams(presence_penalty=0.5, frequency_penalty=0.25))
    processor.admit(2, [1], frozenset(), LogitsParams(frequency_penalty=1.5))
    counts = torch.stack([generate_into(processor, 0, [3, 5, 3]), torch.zeros(VOCAB),
                          generate_into(processor, 2, [7, 7, 7, 7, 69])])
    logits = torch.randn(3, VOCAB)
    out = process_logits(logits, processor.inputs([0, 1, 2]))
    assert torch.equal(out[0], dense_definition(logits[0], counts[0], counts[0] > 0, 0.5, 0.25, 1.0))
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], dense_definition(logits[2], counts[2], counts[2] > 0, 0.0, 1.5, 1.0))
    assert out[0, 3] == logits[0, 3] - 2 * 0.25 - 0.5 and out[2, 7] == logits[2, 7] - 4 * 1.5
    # The distribution moves by exactly that: unpenalized tokens keep their ratios, a token
    # generated twice loses exp(2 * 0.25 + 0.5) against them.
    p, q = logits.softmax(-1), out.softmax(-1)
    assert torch.allclose(q[0, 3] / q[0, 0], p[0, 3] / p[0, 0] * torch.exp(torch.tensor(-1.0)), rtol=1e-5)
    assert torch.allclose(q[0, 1] / q[0, 0], p[0, 1] / p[0, 0], rtol=1e-5)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    processor = LogitsProcessor(slots=1, vocab=VOCAB, device=torch.device("cpu"))
    processor.admit(0, [0, 1, 1], frozenset(), LogitsParams(repetition_penalty=2.0, presence_penalty=0.5))
    counts = generate_into(processor, 0, [1, 4, 4, 68])
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 3.0] + [1.0] * (VOCAB - 5))[None]
    out = process_logits(logits, processor.inputs([0]))
    assert out[0, :5].tolist() == [1.0, -4.5, 2.0, -2.0, 1.0]  # 1 and 4: also the presence penalty
    seen = counts > 0
    seen[[0, 1]] = True
    assert torch.equal(out[0], dense_definition(logits[0], counts, seen, 0.5, 0.0, 2.0))


def test_defaults_are_the_identity_exactly():
    processor = LogitsProcessor(slots=3, vocab=VOCAB, device=torch.device("cpu"))
    processor.admit(1, [4, 5, 6], frozenset({2}), LogitsParams(frequency_penalty=1.0, logit_bias=((9, -3.0),)))
    logits = torch.randn(3, VOCAB) * 10
    out = process_logits(logits, processor.inputs([0, 1, 2]))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 9] == logits[1, 9] - 3.0 and torch.equal(out[1, 4:7], logits[1, 4:7])  # prompt: no frequency


def test_penalties_count_what_the_slot_generated():
    processor = LogitsProcessor(slots=2, vocab=VOCAB, device=torch.device("cpu"))
    processor.admit(0, [1], frozenset(), LogitsParams(presence_penalty=1.0, frequency_penalty=0.5))
    processor.accept({0: 8, 1: 9})
    processor.accept({0: 8})
    logits = torch.zeros(2, VOCAB)
    out = process_logits(logits, processor.inputs([0, 1]))
    assert out[0, 8] == -(1.0 + 2 * 0.5) and out[0].count_nonzero() == 1 and not out[1].any()
    processor.admit(0, [1], frozenset(), LogitsParams(frequency_penalty=0.5))  # a new request: counts cleared
    assert not process_logits(logits, processor.inputs([0, 1])).any()


def test_bitmask_unpacks_every_bit_including_the_sign_bit():
    allowed = torch.zeros(2, VOCAB, dtype=torch.bool)
    allowed[0, [0, 31, 32, 63, 69]] = True
    allowed[1] = True
    words = torch.zeros(2, 3, dtype=torch.int64)
    for row, token in allowed.nonzero().tolist():
        words[row, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack_bitmask(bitmask, VOCAB), allowed)


def test_min_tokens_masks_stop_ids_until_reached():
    processor = LogitsProcessor(slots=1, vocab=VOCAB, device=torch.device("cpu"))
    processor.admit(0, [1], frozenset({2, 63}), LogitsParams(min_tokens=2))
    for _ in range(2):
        out = process_logits(torch.zeros(1, VOCAB), processor.inputs([0]))
        assert out[0, 2] == out[0, 63] == float("-inf") and out[0].isfinite().sum() == VOCAB - 2
        processor.accept({0: 5})
    assert process_logits(torch.zeros(1, VOCAB), processor.inputs([0])).isfinite().all()


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "kind": {"enum": ["cat", "dog"]},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                    "maxItems": 3}},
          "required": ["name", "age", "kind", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("vocabulary", ["llama3", "demo"])
@pytest.mark.parametrize("seed", range(3))
def test_random_sampling_under_the_mask_gives_compact_schema_valid_json(request, vocabulary, seed):
    """Whatever the logits, the grammar's mask admits only schema-valid compact JSON, which ends."""
    tok = request.getfixturevalue(f"{vocabulary}_tokenizer")
    processor = LogitsProcessor(slots=1, vocab=tok.n_words, device=torch.device("cpu"), tokenizer=tok)
    processor.admit(0, [1], frozenset({tok.eos_id}), LogitsParams(grammar=json_schema_grammar(SCHEMA)))
    g = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(200):
        logits = process_logits(torch.randn(1, tok.n_words, generator=g) * 3, processor.inputs([0]))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        tokens.append(token)
        if processor.accept({0: token}):
            break
    else:
        pytest.fail(f"the grammar did not end: {tok.decode(tokens)!r}")
    text = tok.decode(tokens)
    jsonschema.validate(json.loads(text), SCHEMA)
    # Compact: no whitespace outside strings (inside them the grammar may write escapes, "\u007f").
    assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text


def test_unsupported_schema_feature_is_named():
    with pytest.raises(GrammarError, match="not"):
        json_schema_grammar({"type": "object", "properties": {"a": {"not": {"type": "string"}}}})
    with pytest.raises(GrammarError, match="strin"):
        json_schema_grammar({"type": "strin"})
    with pytest.raises(GrammarError, match="look-around"):
        regex_grammar("(?=a)b")


def test_sentencepiece_vocabulary(small_sp_tokenizer):
    tok = Tokenizer(small_sp_tokenizer)
    matcher = Matcher(tok, regex_grammar("Four score"))
    bitmask = torch.zeros(1, (tok.n_words + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    allowed = unpack_bitmask(bitmask, tok.n_words)[0].nonzero().flatten().tolist()
    assert allowed and all("Four score".startswith(tok._sp.id_to_piece(t).replace("\u2581", " ")) for t in allowed)


def test_which_vocabularies_spell_any_text(small_sp_tokenizer, demo_tokenizer, llama3_tokenizer):
    """A grammar can demand any character; only a vocabulary that can write every byte obeys."""
    assert spells_any_text(llama3_tokenizer) and spells_any_text(demo_tokenizer)
    assert spells_any_text(Tokenizer(sentencepiece_32k_path()))  # Llama 2's kind: byte fallback
    small = Tokenizer(small_sp_tokenizer)
    assert not spells_any_text(small)
    assert small._sp.unk_id() in small.encode("{", bos=False)  # what JSON begins with


def test_compiled_step_does_not_recompile_per_request(llama3_tokenizer):
    """After serve.py's warm-up, requests with other penalties, biases, grammars and
    top_logprobs run the compiled steps without compiling them again."""
    from torch._dynamo.utils import counters

    from helpers import LLAMA3_TINY, random_weights
    from llama.args import ModelArgs
    from llama.engine import Engine, EngineConfig, Request, SamplingParams, use_compiled_decode
    from llama.model import Transformer
    from llama.serving import warm_up

    tok = llama3_tokenizer
    args = ModelArgs(**LLAMA3_TINY, vocab_size=tok.n_words)
    model = Transformer(args).eval()
    model.load_state_dict(random_weights(args, seed=3))
    use_compiled_decode(model)
    engine = Engine(model, EngineConfig(max_num_seqs=2), tok)
    warm_up(engine)
    graphs = counters["stats"]["unique_graphs"]
    schema = {"type": "object", "properties": {"b": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["b"], "additionalProperties": False}
    finished = {}
    # One at a time, as the warm-up ran: a larger batch takes another (compiled once) bucket.
    for i, params in enumerate([LogitsParams(frequency_penalty=1.0, repetition_penalty=1.2),
                                LogitsParams(grammar=json_schema_grammar(schema), top_logprobs=3,
                                             logit_bias=((5, 2.0),))]):
        for temperature in (0.0, 1.0):
            engine.submit(Request(2 * i + int(temperature), [1, 2, 3], 6, frozenset({tok.eos_id}),
                                  SamplingParams(temperature, 0.9, i), params))
            while engine.busy:
                finished |= {e.request_id: e.finish_reason for e in engine.step() if e.finish_reason}
    assert finished == {0: "length", 1: "length", 2: "stop", 3: "stop"}
    assert counters["stats"]["unique_graphs"] == graphs
