"""Chat dialogs and Meta's two chat prompt formats.

Llama 2 chat wraps each user turn in [INST] ... [/INST], folds the system prompt into the
first user turn between <<SYS>> tags, and frames every finished exchange with BOS/EOS.
Llama 3 gives every message a header naming its role and ends it with <|eot_id|>; the
prompt ends with an open assistant header for the model to complete.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from llama.errors import UserError
from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")
ChatFormat = Literal["llama2", "llama3"]
CHAT_FORMATS = ("llama2", "llama3")


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

LLAMA2_B_INST, LLAMA2_E_INST = "[INST]", "[/INST]"
LLAMA2_B_SYS, LLAMA2_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Text a Llama 2 chat model reads as structure; a message containing it could forge turns.
LLAMA2_SPECIAL_TAGS = (LLAMA2_B_INST, LLAMA2_E_INST, "<<SYS>>", "<</SYS>>")
LLAMA3_FORMAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def dialog_problem(dialog: object) -> str | None:
    """What is wrong with one dialog, or None when it can be formatted: an optional system
    message, then turns alternating user/assistant that start and end with the user."""
    if not isinstance(dialog, list) or not dialog:
        return "expected a non-empty list of {\"role\", \"content\"} messages"
    turns = dialog[1:] if isinstance(dialog[0], dict) and dialog[0].get("role") == "system" else dialog
    for j, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {j}: expected an object with \"role\" and \"content\""
        if message["role"] not in ROLES:
            return f"message {j}: unknown role {message['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str) or not message["content"].strip():
            return f"message {j}: content must be non-empty text"
    offset = len(dialog) - len(turns)
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = "only the first message may be 'system'; " if message["role"] == "system" else ""
            return (f"message {j + offset}: role {message['role']!r} where {expected!r} is due; {where}"
                    "turns alternate user/assistant, starting with user")
    if not turns or turns[-1]["role"] != "user":
        return "the last message must be from the user: it is what the model answers"
    return None


def parse_dialogs(data: object, source: str) -> list[Dialog]:
    """Check a loaded dialogs file: a list of dialogs, each a list of {role, content}."""
    if isinstance(data, list) and data and all(isinstance(m, dict) for m in data):
        raise UserError(f"{source}: expected a list of dialogs, got a single dialog; wrap it in [ ]")
    if not isinstance(data, list) or not data:
        raise UserError(f"{source}: expected a non-empty JSON list of dialogs, each a list of "
                        "{\"role\", \"content\"} messages")
    for i, dialog in enumerate(data):
        problem = dialog_problem(dialog)
        if problem:
            raise UserError(f"{source}: dialog {i}: {problem}")
    return data


def load_dialogs(path: Path) -> list[Dialog]:
    """Read and check a --dialogs file."""
    source = f"--dialogs {path}"
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"{source}: cannot read it ({e.strerror}); pass a JSON file of dialogs") from None
    except ValueError as e:  # invalid JSON or text that is not UTF-8
        raise UserError(f"{source}: not valid JSON ({e})") from None
    return parse_dialogs(data, source)


def with_system(dialog: Dialog, system: str | None) -> Dialog:
    """`dialog` opened by the system prompt, unless it has its own or there is none."""
    if not system or dialog[0]["role"] == "system":
        return dialog
    return [{"role": "system", "content": system}, *dialog]


def resolve_chat_format(tokenizer: Tokenizer, override: str | None = None) -> ChatFormat:
    """The tokenizer's own chat format unless `override` (--chat_format) names another."""
    chat_format = override or tokenizer.family
    if chat_format == "llama3" and tokenizer.family != "llama3":
        raise UserError(f"--chat_format llama3 needs a Llama 3 tokenizer (for {', '.join(LLAMA3_FORMAT_TOKENS)}); "
                        f"{tokenizer.path} is a sentencepiece model: use --chat_format llama2")
    return chat_format


def forbidden_tags(text: str, chat_format: ChatFormat) -> list[str]:
    """Chat tags in `text` that the format cannot let through. Llama 2 marks structure with
    plain text, so a message holding its tags could forge turns; Llama 3 encodes tag text in
    messages as ordinary text, never as its control tokens, so nothing is forbidden there."""
    if chat_format != "llama2":
        return []
    return [tag for tag in LLAMA2_SPECIAL_TAGS if tag in text]


def refusal(dialog: Dialog, chat_format: ChatFormat) -> str | None:
    """Why the dialog cannot be sent to the model, or None."""
    for j, message in enumerate(dialog):
        found = forbidden_tags(message["content"], chat_format)
        if found:
            return f"message {j} contains {', '.join(found)}; Llama 2 chat tags are not allowed in messages"
    return None


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, chat_format: ChatFormat) -> list[int]:
    """Token ids of the prompt asking the model for the next assistant message."""
    if chat_format == "llama2":
        return _encode_llama2(tokenizer, dialog)
    return _encode_llama3(tokenizer, dialog)


def encode_dialogs(tokenizer: Tokenizer, dialogs: list[Dialog], chat_format: ChatFormat,
                   max_seq_len: int) -> list[list[int] | str]:
    """Each dialog's prompt tokens, or the reason it is refused (the others still run)."""
    encoded: list[list[int] | str] = []
    for i, dialog in enumerate(dialogs):
        reason = refusal(dialog, chat_format)
        if reason:
            encoded.append(reason)
            continue
        tokens = encode_dialog(tokenizer, dialog, chat_format)
        if len(tokens) >= max_seq_len:
            raise UserError(f"dialog {i} has {len(tokens)} prompt tokens, at least max_seq_len {max_seq_len}; "
                            "shorten it or raise --max_seq_len")
        encoded.append(tokens)
    return encoded


def chat_stop_ids(tokenizer: Tokenizer, chat_format: ChatFormat) -> frozenset[int]:
    """Ids that end an assistant message: EOS for Llama 2; end of turn, end of text and end of
    message (a tool call awaiting its result) for Llama 3."""
    if chat_format == "llama2":
        return frozenset({tokenizer.eos_id})
    special = tokenizer.special_tokens
    return frozenset({special["<|eot_id|>"], special["<|end_of_text|>"], special["<|eom_id|>"]})


def _encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    if dialog[0]["role"] == "system":
        system, first, *rest = dialog
        merged = LLAMA2_B_SYS + system["content"] + LLAMA2_E_SYS + first["content"]
        dialog = [{"role": first["role"], "content": merged}, *rest]
    tokens = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        exchange = f"{LLAMA2_B_INST} {user['content'].strip()} {LLAMA2_E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(exchange, bos=True, eos=True)
    return tokens + tokenizer.encode(f"{LLAMA2_B_INST} {dialog[-1]['content'].strip()} {LLAMA2_E_INST}", bos=True)


def _llama3_header(tokenizer: Tokenizer, role: str) -> list[int]:
    special = tokenizer.special_tokens
    return [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False), special["<|end_header_id|>"],
            *tokenizer.encode("\n\n", bos=False)]


def _encode_llama3(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    special = tokenizer.special_tokens
    tokens = [special["<|begin_of_text|>"]]
    for message in dialog:
        tokens += _llama3_header(tokenizer, message["role"]) + tokenizer.encode(message["content"].strip(), bos=False)
        tokens.append(special["<|eot_id|>"])
    return tokens + _llama3_header(tokenizer, "assistant")


# ---------------------------------------------------------------------------------------
# Tool calls, in Llama 3.1's JSON-based format (also Llama 3.2 and 3.3 text models): the
# system message opens with "Environment: ipython" and the dates, the functions come as a
# user message before the conversation, the model answers with <|python_tag|>, a JSON object
# {"type": "function", "name", "parameters"} and <|eom_id|>, and a tool's result comes back
# in an "ipython" message.

TOOL_KNOWLEDGE_CUTOFF = "December 2023"
TOOLS_INTRO = ("Answer the user's question by making use of the following functions if needed.\n"
               "If none of the function can be used, please say so.\n"
               "Here is a list of functions in JSON format:\n")
TOOLS_OUTRO = "\n\nReturn function calls in JSON format."
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def tools_system_text(system: str | None, today: datetime.date) -> str:
    """The system message of a dialog that offers tools."""
    text = (f"Environment: ipython\n\nCutting Knowledge Date: {TOOL_KNOWLEDGE_CUTOFF}\n"
            f"Today Date: {today.day} {today:%B %Y}\n\n")
    return text + (system.strip() + "\n" if system and system.strip() else "")


def tools_user_text(tools: list[dict]) -> str:
    """The user message listing the functions (OpenAI's tool objects, indented as Meta shows them)."""
    return TOOLS_INTRO + "\n\n".join(json.dumps(tool, indent=4) for tool in tools) + TOOLS_OUTRO


def tool_call_text(call: ToolCall) -> str:
    """An assistant's tool call as the model writes it (without <|python_tag|> and <|eom_id|>)."""
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


def tool_call_schema(tool: dict) -> dict:
    """The JSON schema of the model's call of one function, for constrained decoding."""
    function = tool["function"]
    return {"type": "object",
            "properties": {"type": {"const": "function"}, "name": {"const": function["name"]},
                           "parameters": function.get("parameters") or {"type": "object"}},
            "required": ["type", "name", "parameters"], "additionalProperties": False}


def parse_tool_call(text: str, names: set[str]) -> ToolCall | None:
    """The tool call a completion holds, or None when it is an ordinary answer: a JSON object
    naming one of `names`, with its "parameters" (or "arguments"), after an optional <|python_tag|>."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("parameters", call.get("arguments", {}))
    return ToolCall(call["name"], arguments) if isinstance(arguments, dict) else None


def tool_dialog_problem(dialog: list[dict]) -> str | None:
    """What is wrong with a dialog that may hold tool calls and results: an optional system
    message, then user turns, each answered by assistant messages; an assistant tool call is
    followed by its results ("tool" messages) and the assistant's next message."""
    turns = dialog[1:] if dialog and dialog[0]["role"] == "system" else dialog
    offset = len(dialog) - len(turns)
    previous = None
    for j, message in enumerate(turns):
        role, where = message["role"], f"message {j + offset}"
        if role == "system":
            return f"{where}: only the first message may be 'system'"
        if role == "tool" and not (previous == "assistant_call" or previous == "tool"):
            return f"{where}: a 'tool' message must follow an assistant message with tool_calls"
        if previous == "assistant_call" and role != "tool":
            return f"{where}: an assistant message with tool_calls must be followed by the 'tool' results"
        if role == "assistant" and previous in (None, "assistant"):
            return f"{where}: an assistant message must answer a user or tool message"
        if role != "tool" and not message.get("tool_calls") and not message["content"].strip():
            return f"{where}: content must be non-empty text"
        previous = "assistant_call" if message.get("tool_calls") else role
    if previous not in ("user", "tool"):
        return "the last message must be from the user or a tool: it is what the model answers"
    return None


def encode_tool_dialog(tokenizer: Tokenizer, dialog: list[dict], tools: list[dict] | None,
                       today: datetime.date) -> list[int]:
    """A Llama 3 prompt whose messages may hold tool calls ("tool_calls": [ToolCall]) and tool
    results (role "tool", sent as "ipython"); `tools`, if any, are offered to the model."""
    special = tokenizer.special_tokens

    def message(role: str, text: str, end: str = "<|eot_id|>", tag: bool = False) -> list[int]:
        tag_ids = [special[PYTHON_TAG]] if tag else []
        return [*_llama3_header(tokenizer, role), *tag_ids, *tokenizer.encode(text, bos=False),
                special[end]]

    system = dialog[0]["content"] if dialog and dialog[0]["role"] == "system" else None
    turns = dialog[1:] if system is not None else dialog
    tokens = [special["<|begin_of_text|>"]]
    if tools:
        tokens += message("system", tools_system_text(system, today)) + message("user", tools_user_text(tools))
    elif system is not None:
        tokens += message("system", system.strip())
    for m in turns:
        if m.get("tool_calls"):
            # One call per message in Meta's format; several are joined as vLLM's parser reads them.
            calls = "; ".join(tool_call_text(call) for call in m["tool_calls"])
            tokens += message("assistant", calls, end="<|eom_id|>", tag=True)
        else:
            tokens += message("ipython" if m["role"] == "tool" else m["role"], m["content"].strip())
    return tokens + _llama3_header(tokenizer, "assistant")
