"""Tool calls in Meta's JSON-based format for Llama 3.1-3.3: the rendered prompt against the
format's documentation (llama-models, llama3_1/prompt_format.md, "JSON based tool calling"),
written here as expected strings, and the parsing of the model's answer."""

from __future__ import annotations

import datetime

import pytest

from helpers import llama3_tokenizer_path
from llama.chat import ToolCall, encode_tool_dialog, parse_tool_call, tool_dialog_problem
from llama.tokenizer import Tokenizer

TODAY = datetime.date(2024, 9, 21)
TOOL = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "description": "The number of songs to return"},
        "genre": {"type": "string", "description": "The genre of the songs to return"}}, "required": ["n"]}}}
# The documented prompt, with the function written as the request gives it (the document's
# example lists the parameters in a lossy form of its own; the layout around it is the same).
EXPECTED_PROMPT = """<|begin_of_text|><|start_header_id|>system<|end_header_id|>

Environment: ipython

Cutting Knowledge Date: December 2023
Today Date: 21 September 2024

You are a helpful assistant.
<|eot_id|><|start_header_id|>user<|end_header_id|>

Answer the user's question by making use of the following functions if needed.
If none of the function can be used, please say so.
Here is a list of functions in JSON format:
{
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {
                    "type": "integer",
                    "description": "The number of songs to return"
                },
                "genre": {
                    "type": "string",
                    "description": "The genre of the songs to return"
                }
            },
            "required": [
                "n"
            ]
        }
    }
}

Return function calls in JSON format.<|eot_id|><|start_header_id|>user<|end_header_id|>

Use tools to get latest trending songs<|eot_id|><|start_header_id|>assistant<|end_header_id|>

"""
# The model's call (documented response format: <|python_tag|>, the JSON call, <|eom_id|>),
# then the result in an "ipython" message.
EXPECTED_ROUND_TRIP = EXPECTED_PROMPT + (
    '<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": 10}}<|eom_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n["Song A", "Song B"]<|eot_id|>'
    "<|start_header_id|>assistant<|end_header_id|>\n\n")
DIALOG = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Use tools to get latest trending songs"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(llama3_tokenizer_path())


def reference_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The documented prompt tokenized as one string, its special-token text as those tokens."""
    return tokenizer._tt.encode(text, allowed_special="all")


@pytest.mark.parametrize("dialog, expected", [
    (DIALOG, EXPECTED_PROMPT),
    (DIALOG + [{"role": "assistant", "content": "", "tool_calls": [ToolCall("trending_songs", {"n": 10})]},
               {"role": "tool", "content": '["Song A", "Song B"]'}], EXPECTED_ROUND_TRIP),
])
def test_prompt_matches_meta_json_tool_format(tokenizer, dialog, expected):
    assert tool_dialog_problem(dialog) is None
    tokens = encode_tool_dialog(tokenizer, dialog, [TOOL], TODAY)
    assert tokenizer.decode(tokens) == expected
    assert tokens == reference_tokens(tokenizer, expected)


def test_without_tools_the_prompt_is_the_plain_chat_format(tokenizer):
    from llama.chat import encode_dialog

    assert encode_tool_dialog(tokenizer, DIALOG, None, TODAY) == encode_dialog(tokenizer, DIALOG, "llama3")


@pytest.mark.parametrize("text, call", [
    ('<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}',
     ToolCall("trending_songs", {"n": "10", "genre": "all"})),
    ('{"name":"trending_songs","parameters":{"n":3}}', ToolCall("trending_songs", {"n": 3})),
    ('{"name": "trending_songs", "arguments": {}}', ToolCall("trending_songs", {})),
    ('{"name": "other", "parameters": {}}', None),
    ("The trending songs are unknown.", None),
    ('{"name": "trending_songs", "parameters": [1]}', None),
])
def test_parse_tool_call(text, call):
    assert parse_tool_call(text, {"trending_songs"}) == call


@pytest.mark.parametrize("dialog, problem", [
    ([{"role": "tool", "content": "x"}], "must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [ToolCall("f", {})]},
      {"role": "user", "content": "b"}], "must be followed by the 'tool' results"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "the last message"),
])
def test_tool_dialog_problems(dialog, problem):
    assert problem in tool_dialog_problem(dialog)
