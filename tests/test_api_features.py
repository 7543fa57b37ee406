"""The OpenAI features applications use, served at TP=2 over real HTTP on 127.0.0.1 and read
with the official openai client: structured outputs, tool calls, n, top logprobs, penalties
and biases. One server (a tiny Llama 3 with random weights and Meta's real Llama 3 tokenizer)
serves every test but the demo model's structured outputs."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, Field

from helpers import LLAMA3_TINY, convert, llama3_tokenizer_path, make_meta_checkpoint, random_weights
from llama.args import ModelArgs
from llama.chat import ToolCall, encode_dialog, encode_tool_dialog
from llama.model import Transformer
from llama.tokenizer import Tokenizer
from test_serve import API_KEY, Server, no_rank_traceback

ARCH = {**LLAMA3_TINY, "max_seq_len": 1024}
SEEDS = range(4)


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "parrot"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["n"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py at TP=2 on a tiny Llama 3 (random weights, Meta's tokenizer), with room for tool prompts."""
    meta, ckpt = tmp_path_factory.mktemp("features_meta"), tmp_path_factory.mktemp("features_dcp") / "tiny3"
    make_meta_checkpoint(meta, llama3_tokenizer_path(), **ARCH)
    convert(meta, ckpt)
    srv = Server(ckpt, "--api_key", API_KEY, "--max_seq_len", "1024")
    yield srv
    _, err = srv.stop()
    assert no_rank_traceback(err), err


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference_model(tokenizer) -> Transformer:
    """The served weights, at TP=1 in this process."""
    args = ModelArgs(**ARCH, vocab_size=tokenizer.n_words)
    model = Transformer(args).eval()
    model.load_state_dict(random_weights(args, seed=0))
    return model


def chat(client, server, **kwargs):
    return client.chat.completions.create(model=server.model, **{"messages": ASK, "max_tokens": 200, **kwargs})


def bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


# --- structured outputs


@pytest.mark.parametrize("seed", SEEDS)
def test_parse_with_pydantic_model_validates(client, server, seed):
    completion = client.beta.chat.completions.parse(model=server.model, messages=ASK, response_format=Pet,
                                                    max_tokens=200, temperature=1.0, seed=seed)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Pet)
    assert choice.message.content == choice.message.parsed.model_dump_json()  # compact JSON, in field order


@pytest.fixture(scope="module")
def demo_server(demo_build):
    """serve.py --demo at TP=2: the model that learned the Gettysburg Address, whose tokenizer
    spells JSON's "{", quotes and digits only with its byte pieces."""
    srv = Server(None, "--api_key", API_KEY, "--max_seq_len", "512", env={"TP_LLAMA_CACHE": str(demo_build[0])})
    yield srv
    _, err = srv.stop()
    assert no_rank_traceback(err), err


@pytest.mark.parametrize("seed", SEEDS)
def test_parse_with_pydantic_model_validates_on_the_demo_model(demo_server, seed):
    client = OpenAI(base_url=demo_server.url, api_key=API_KEY, max_retries=0, timeout=120)
    completion = client.beta.chat.completions.parse(
        model=demo_server.model, messages=[{"role": "user", "content": "Four score and seven years ago"}],
        response_format=Pet, max_tokens=200, temperature=1.0, seed=seed)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Pet)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_is_json(client, server, tokenizer, seed):
    """Any JSON object: its strings have no bound, and random weights, to which a closing quote
    is one token in hundreds, write them until max_tokens (the output is then a prefix of
    JSON). A bias towards closing quotes, as a trained model has, lets them end."""
    closing = {str(tokenizer.encode(text, bos=False)[0]): 12 for text in ('"', '"}')}
    reply = chat(client, server, response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=400,
                 logit_bias=closing)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_streamed_structured_output_concatenates_to_valid_json(client, server):
    schema = {"name": "Pet", "schema": {**Pet.model_json_schema(), "additionalProperties": False}, "strict": True}
    stream = chat(client, server, response_format={"type": "json_schema", "json_schema": schema}, temperature=1.0,
                  seed=7, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3
    Pet.model_validate_json(text)


def test_guided_choice_and_regex(client, server):
    reply = chat(client, server, extra_body={"guided_choice": ["yes", "no"]}, temperature=1.0, seed=1)
    assert reply.choices[0].message.content in ("yes", "no")
    reply = chat(client, server, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}, temperature=1.0, seed=1)
    assert reply.choices[0].message.content[3] == "-" and reply.choices[0].finish_reason == "stop"


# --- tool calls


def test_tool_call_round_trip(client, server, tokenizer):
    tools = [SONGS, WEATHER]
    reply = chat(client, server, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=1.0, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # The prompt is Meta's format for these messages (tests/test_tool_format.py checks it
    # against the documentation), with today's date.
    dialog = [{"role": "user", "content": ASK[0]["content"]}]
    expected = encode_tool_dialog(tokenizer, dialog, tools, datetime.datetime.now(datetime.timezone.utc).date())
    assert reply.usage.prompt_tokens == len(expected)

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = chat(client, server, messages=history, tools=tools, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    dialog += [{"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", arguments)]},
               {"role": "tool", "content": '{"temperature": 21}'}]
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert answer.usage.prompt_tokens == len(encode_tool_dialog(tokenizer, dialog, tools, today))


@pytest.mark.parametrize("seed", SEEDS)
def test_required_tool_call_always_parses(client, server, seed):
    reply = chat(client, server, tools=[SONGS, WEATHER], tool_choice="required", temperature=1.0, seed=seed)
    call = reply.choices[0].message.tool_calls[0]
    tool = {"trending_songs": SONGS, "get_weather": WEATHER}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_call_streams_as_deltas(client, server):
    stream = chat(client, server, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=5, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_answer_in_text(client, server):
    for tool_choice in ("none", "auto"):
        reply = chat(client, server, tools=[WEATHER], tool_choice=tool_choice, max_tokens=6, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and not reply.choices[0].message.tool_calls


def test_auto_tool_choice_streams_plain_answers_whole(client, server):
    """Text held back while it might be a tool call is sent once it is not, with its logprobs."""
    kwargs = dict(tools=[WEATHER], tool_choice="auto", max_tokens=12, temperature=0, logprobs=True,
                  extra_body={"ignore_eos": True})
    whole = chat(client, server, **kwargs).choices[0]
    chunks = [c for c in chat(client, server, stream=True, **kwargs) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs.content] and len(streamed) == 12


# --- n, logprobs, penalties


def prefix_cache_hits(server) -> float:
    metrics = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=60).text
    return float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("tp_llama:prefix_cache_hits_total")))


def test_n_choices_are_seeded_and_share_the_prompt(client, server):
    hits = prefix_cache_hits(server)
    messages = [{"role": "user", "content": f"A prompt no other test sends, {server.model}, long enough for blocks"}]
    shared = chat(client, server, messages=messages, n=3, seed=1, temperature=1.0, max_tokens=2)
    blocks = shared.usage.prompt_tokens // 16  # the engine's default block size
    assert prefix_cache_hits(server) - hits >= 2 * 16 * blocks > 0  # the 2nd and 3rd choice reuse the 1st's
    first, again = (chat(client, server, n=3, seed=11, temperature=1.0, max_tokens=8) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in again.choices]
    one = chat(client, server, seed=11, temperature=1.0, max_tokens=8)
    assert first.usage.prompt_tokens == one.usage.prompt_tokens and one.choices[0].message.content == texts[0]
    greedy = chat(client, server, n=3, temperature=0, max_tokens=8)
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens


def test_top_logprobs_are_the_model_top_k(client, server, tokenizer, reference_model):
    reply = chat(client, server, logprobs=True, top_logprobs=20, temperature=0, max_tokens=6)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(c.top_logprobs) == 20 for c in content)
    tokens = encode_dialog(tokenizer, ASK, "llama3")
    for item in content:  # greedy decoding by a direct forward of the same weights at TP=1
        with torch.inference_mode():
            logprobs = reference_model(torch.tensor([tokens]), all_logits=True)[0, -1].log_softmax(-1)
        values, ids = logprobs.topk(20)
        assert [a.token for a in item.top_logprobs] == [tokenizer.decode([t]) for t in ids.tolist()]
        assert torch.allclose(torch.tensor([a.logprob for a in item.top_logprobs]), values, atol=1e-4)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob
        tokens.append(int(ids[0]))


def test_completion_logprobs_list_alternatives(client, server):
    reply = client.completions.create(model=server.model, prompt="Four score", max_tokens=4, temperature=0,
                                      logprobs=5, stream=False)
    lp = reply.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) and all(len(alt) <= 5 for alt in lp.top_logprobs)
    assert all(alt[token] == value for alt, token, value in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))


def test_frequency_penalty_is_applied_as_defined(client, server, tokenizer):
    """A token biased to win every step (+30) stops winning under a frequency penalty, and at
    each step greedy picks the best of logprob + bias - penalty x (times generated so far)
    among the tokens whose logprobs the reply lists (the top 20 and the chosen one)."""
    paris, penalty = tokenizer.decode(tokenizer.encode(" Paris", bos=False)), 2.0
    bias = {str(tokenizer.encode(" Paris", bos=False)[0]): 30}
    plain = chat(client, server, temperature=0, max_tokens=24, logit_bias=bias, extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == paris * 24
    reply = chat(client, server, logprobs=True, top_logprobs=20, temperature=0, max_tokens=24, logit_bias=bias,
                 frequency_penalty=penalty, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    counts: dict[str, int] = {}
    for item in content:
        listed = {a.token: a.logprob for a in item.top_logprobs} | {item.token: item.logprob}
        scores = {t: lp + 30 * (t == paris) - penalty * counts.get(t, 0) for t, lp in listed.items()}
        assert item.token == max(scores, key=scores.get)
        counts[item.token] = counts.get(item.token, 0) + 1
    assert 0 < counts[paris] < 24


def test_logit_bias_min_tokens_and_ignore_eos(client, server, tokenizer):
    token = tokenizer.encode(" Paris", bos=False)[0]
    reply = chat(client, server, logit_bias={str(token): 100}, temperature=1.0, seed=0, max_tokens=5)
    assert reply.choices[0].message.content == " Paris" * 5
    end_of_turn = {str(tokenizer.special_tokens["<|eot_id|>"]): 100}
    reply = chat(client, server, logit_bias=end_of_turn, temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 0
    reply = chat(client, server, logit_bias=end_of_turn, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    reply = chat(client, server, logit_bias=end_of_turn, temperature=0, max_tokens=12, extra_body={"min_tokens": 3})
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 3


def test_greedy_without_the_new_fields_is_unchanged_next_to_them(client, server):
    """A plain greedy request gives the same tokens alone and beside requests that use
    penalties, biases and grammars in the same steps."""
    alone = chat(client, server, temperature=0, max_tokens=16).choices[0].message.content
    busy = [dict(frequency_penalty=1.0, temperature=0), dict(response_format={"type": "json_object"}),
            dict(logit_bias={"5": 50}, logprobs=True, top_logprobs=3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(chat, client, server, max_tokens=16, **kwargs) for kwargs in busy]
        beside = pool.submit(chat, client, server, temperature=0, max_tokens=16)
        [f.result() for f in others]
        assert beside.result().choices[0].message.content == alone


# --- bad values


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=0), "n"),
    (dict(n=17), "n"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools.0.function.name"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}), "guided_regex"),
])
def test_bad_values_get_400_naming_the_field(client, server, kwargs, param):
    error = bad_request(lambda: chat(client, server, **kwargs))
    assert error.body["param"] == param and param.split(".")[0] in error.body["message"], error.body


def test_unsupported_schema_feature_is_named(client, server):
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    error = bad_request(lambda: chat(client, server, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert '"not"' in error.body["message"]


def test_raw_http_tool_message_without_call_is_400(server):
    response = httpx.post(server.url + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
