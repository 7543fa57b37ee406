"""The OpenAI-compatible HTTP API (FastAPI), served by rank 0 in front of the engine loop.

Handlers validate and tokenize a request, hand it to the `Scheduler`, and turn the token
events that come back into OpenAI's response objects, or into server-sent event chunks when
streamed. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from llama.chat import (PYTHON_TAG, ChatFormat, ToolCall, chat_stop_ids, dialog_problem, encode_dialog,
                        encode_tool_dialog, parse_tool_call, refusal, tool_call_schema, tool_dialog_problem)
from llama.engine import FINISH_CANCELLED, Request, SamplingParams, TokenEvent
from llama.logits_processing import MAX_TOP_LOGPROBS, LogitsParams
from llama.structured import (ANY_JSON_OBJECT, GrammarError, choice_grammar, json_schema_grammar, regex_grammar,
                              spells_any_text)
from llama.serving import QueueFull, Scheduler, ServerStopping, TextStream
from llama.tokenizer import Tokenizer

RETRY_AFTER_S = 1
# `stop`: at most OpenAI's 4 strings, each at most this many characters (every new token checks
# whether the text's end could begin one, in time that grows with their length).
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256
# Host headers a server bound to a loopback address answers (a web page's script that reaches
# it through a DNS name rebound to 127.0.0.1 sends its own name, and is refused).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
MAX_N = 16  # choices per prompt
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value
SEED_STRIDE = 0x9E3779B97F4A7C15  # between the seeds of a request's n choices (odd: they never repeat)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers


def error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------------------
# Request schemas (the fields the server reads; others are ignored, as OpenAI's server does)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class MessageToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


# ---------------------------------------------------------------------------------------
# One request's choices as they are generated


@dataclass
class Choice:
    """One completion of a request: its engine request, text so far and how it ended."""

    request: Request
    text: TextStream
    prefix: str = ""  # the echoed prompt
    repeats_prompt: bool = False  # one of n > 1 completions of a prompt, but not the first
    tools: frozenset[str] = frozenset()  # names of the functions its answer may call
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Update:
    """What one event added to a choice: text to send, the token, its logprob and alternatives."""

    index: int
    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Job:
    """The choices of one HTTP request and the events that advance them."""

    def __init__(self, scheduler: Scheduler, choices: list[Choice]) -> None:
        self.scheduler = scheduler
        self.choices = choices
        self.index = {c.request.id: i for i, c in enumerate(choices)}
        if len(choices) > scheduler.capacity:  # would never fit: not worth a retry
            raise APIError(400, f"prompt: {len(choices)} choices, more than this server ever holds at once "
                           f"({scheduler.capacity} requests running or queued); ask for at most that many",
                           param="prompt")
        try:
            self.events = scheduler.submit([c.request for c in choices], asyncio.get_running_loop())
        except QueueFull:
            raise APIError(503, f"the server is at capacity ({scheduler.capacity} requests running or queued); "
                           "retry shortly", code="server_busy", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ServerStopping as e:
            raise APIError(503, str(e), kind="server_error") from None

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def updates(self) -> AsyncIterator[Update]:
        """Each event's effect until every choice has finished; a stop string ends its choice
        at once (the engine request is cancelled)."""
        while not self.done:
            item = await self.events.get()
            if isinstance(item, Exception):
                raise APIError(503, str(item), kind="server_error")
            update = self._apply(item)
            if update is not None:
                yield update

    def _apply(self, event: TokenEvent) -> Update | None:
        i = self.index[event.request_id]
        choice = self.choices[i]
        if choice.finish_reason is not None:  # already ended by a stop string
            return None
        text = ""
        if event.token is not None:
            choice.tokens.append(event.token)
            choice.logprobs.append(event.logprob)
            choice.top_logprobs.append(event.top_logprobs)
            text = choice.text.add(event.token)
        finish = event.finish_reason
        if choice.text.stopped:
            finish = "stop"
            if event.finish_reason is None:
                self.scheduler.cancel(choice.request.id)
        if finish is not None:
            text += choice.text.finish()
            choice.finish_reason = "stop" if finish == FINISH_CANCELLED else finish
        return Update(i, text, event.token, event.logprob, choice.finish_reason, event.top_logprobs)

    def cancel_unfinished(self) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                self.scheduler.cancel(choice.request.id)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.request.prompt) for c in self.choices if not c.repeats_prompt)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------
# The app


@dataclass
class ServerConfig:
    model_name: str
    tokenizer: Tokenizer
    chat_format: ChatFormat
    max_seq_len: int
    kv_cache_tokens: int  # the whole KV cache pool: no prompt longer than it can ever run
    api_key: str | None
    max_body_bytes: int  # larger bodies get 413 before they are read
    loopback_only: bool  # bound to a loopback address: only LOOPBACK_HOSTS in Host


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(serve.py --max_body_bytes)")


class Gate:
    """ASGI middleware that refuses a request before its body is read: an unexpected Host on a
    loopback-bound server (400), a missing or wrong API key on /v1 (401), a declared body over
    the limit (413); a body that turns out longer (chunked) ends at the limit."""

    def __init__(self, app: object, config: ServerConfig) -> None:
        self.app, self.config = app, config
        self.expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._problem(scope["path"], dict(scope["headers"]))
        if problem:
            return await error_response(problem)(scope, receive, send)
        limit, received = self.config.max_body_bytes, 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)

    def _problem(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if self.config.loopback_only:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host[:host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]  # without the port
            if name not in LOOPBACK_HOSTS:
                return APIError(400, f"Host header {host[:100]!r} is not this server's: it listens on a loopback "
                                "address, and answers only 127.0.0.1, localhost or [::1]", code="invalid_host")
        if self.expected and (path == "/v1" or path.startswith("/v1/")):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY' with the "
                                "server's key", code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.config.max_body_bytes:
            return APIError(413, BodyTooLarge(self.config.max_body_bytes).detail, code="request_too_large")
        return None


def create_app(config: ServerConfig, scheduler: Scheduler) -> FastAPI:
    app = FastAPI(title="tp-llama", docs_url=None, redoc_url=None)
    app.add_middleware(Gate, config=config)
    tokenizer = config.tokenizer

    @app.exception_handler(APIError)
    async def on_api_error(_: HTTPRequest, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(APIError(400, f"{where}: {first['msg']}" if where else first["msg"],
                                       param=where or None))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: HTTPRequest, error: HTTPException) -> JSONResponse:
        if isinstance(error, BodyTooLarge):
            return error_response(APIError(413, error.detail, code="request_too_large"))
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=str(error.status_code)))

    def check_common(body: SamplingFields) -> None:
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{config.model_name}'",
                           param="model", code="model_not_found")
        stops = stop_strings(body)
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters "
                           "each", param="stop")
        for i, stop in enumerate(stops):
            check_text(stop, f"stop[{i}]" if isinstance(body.stop, list) else "stop")

    def check_text(text: str, what: str) -> None:
        """JSON can carry half of a UTF-16 surrogate pair ("\\ud800"), which is no character."""
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise APIError(400, f"{what}: not valid Unicode (a lone surrogate {text[e.start]!r} at character "
                           f"{e.start}); send whole characters", param=what.split("[")[0]) from None

    def logit_bias(body: SamplingFields) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or not 0 <= int(key) < tokenizer.n_words:
                raise APIError(400, f"logit_bias: key {key!r} is not a token id in [0, {tokenizer.n_words})",
                               param="logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise APIError(400, f"logit_bias: value {value} for token {key} is outside "
                               f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", param="logit_bias")
            pairs.append((int(key), value))
        return tuple(pairs)

    def grammar(body: SamplingFields, tool_call: dict | None = None) -> str | None:
        """The grammar the output must follow: from response_format, the guided_* extras or a
        tool call that tool_choice requires; at most one of them."""
        response_format = getattr(body, "response_format", None)
        asked = {name: value for name, value in [
            ("response_format", response_format if response_format and response_format.type != "text" else None),
            ("guided_json", body.guided_json), ("guided_regex", body.guided_regex),
            ("guided_choice", body.guided_choice), ("tool_choice", tool_call)] if value is not None}
        if len(asked) > 1:
            raise APIError(400, f"{', '.join(asked)}: ask for one output constraint at a time", param=list(asked)[-1])
        if not asked:
            return None
        (name, value), = asked.items()
        if not spells_any_text(tokenizer):
            raise APIError(400, f"{name}: constrained decoding needs a vocabulary that can spell any text, and this "
                           "model's sentencepiece tokenizer has no byte pieces (it was trained without byte "
                           "fallback)", param=name)
        if name == "response_format":
            if value.type == "json_object":
                name, value = "response_format", ANY_JSON_OBJECT
            elif value.json_schema is None or value.json_schema.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema: required with type json_schema",
                               param="response_format.json_schema.schema")
            else:
                name, value = "response_format.json_schema.schema", value.json_schema.schema_
        try:
            if name == "guided_regex":
                return regex_grammar(value)
            if name == "guided_choice":
                return choice_grammar(value)
            return json_schema_grammar(value)
        except GrammarError as e:
            raise APIError(400, f"{name}: not supported for constrained decoding: {e}", param=name) from None

    def logits_params(body: SamplingFields, top_logprobs: int, grammar_text: str | None) -> LogitsParams:
        return LogitsParams(body.presence_penalty, body.frequency_penalty, body.repetition_penalty, logit_bias(body),
                            body.min_tokens, top_logprobs, grammar_text)

    def stop_strings(body: SamplingFields) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def choices_for(body: SamplingFields, prompt: list[int], stop_ids: frozenset[int], max_tokens: int | None,
                    what: str, logits: LogitsParams, prefix: str = "",
                    tools: frozenset[str] = frozenset()) -> list[Choice]:
        """The n completions of one prompt, each with its own seed (the first with the request's)."""
        if not prompt:
            raise APIError(400, f"{what} is empty", param=what.split("[")[0])
        room = config.max_seq_len - len(prompt)
        if room <= 0:
            raise APIError(400, f"{what} has {len(prompt)} tokens, but this server's max_seq_len is "
                           f"{config.max_seq_len} (a prompt must leave room for at least one new token); "
                           "shorten it", param=what.split("[")[0], code="context_length_exceeded")
        if len(prompt) >= config.kv_cache_tokens:
            raise APIError(400, f"{what} has {len(prompt)} tokens, but this server's KV cache holds "
                           f"{config.kv_cache_tokens} tokens in all (a prompt must leave room for at least one new "
                           "token); shorten it", param=what.split("[")[0], code="context_length_exceeded")
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        stop_ids = frozenset() if body.ignore_eos else stop_ids
        choices = []
        for j in range(body.n):
            sampling = SamplingParams(body.temperature, body.top_p, (seed + j * SEED_STRIDE) % 2**63)
            request = Request(scheduler.new_id(), prompt, min(max_tokens or room, room), stop_ids, sampling, logits)
            choices.append(Choice(request, TextStream(tokenizer, stop_strings(body)), prefix, j > 0, tools))
        return choices

    def validate_token_ids(prompt: list[int], what: str) -> None:
        if any(not 0 <= t < tokenizer.n_words for t in prompt):
            raise APIError(400, f"{what}: token ids must lie in [0, {tokenizer.n_words})", param="prompt")

    @app.get("/health")
    async def health() -> dict:
        running = scheduler.running
        return {"status": "ok", "running": running, "waiting": max(0, scheduler.in_flight - running)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(scheduler.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "tp-llama",
                "max_model_len": config.max_seq_len, "vocab_size": tokenizer.n_words}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_common(body)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
            else [body.prompt]
        logits = logits_params(body, body.logprobs or 0, grammar(body))
        choices = []
        for i, prompt in enumerate(prompts):
            what = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            if isinstance(prompt, str):
                check_text(prompt, what)
                tokens = tokenizer.encode(prompt, bos=True) if prompt else []
                text = prompt
            else:
                validate_token_ids(prompt, what)
                tokens, text = list(prompt), tokenizer.decode(list(prompt))
            choices += choices_for(body, tokens, tokenizer.stop_ids, body.max_tokens, what, logits,
                                   prefix=text if body.echo else "")
        job = Job(scheduler, choices)
        reply = Reply("cmpl", "text_completion", config.model_name, job, tokenizer, chat=False,
                      logprobs=body.logprobs is not None)
        return reply.stream(body) if body.stream else await reply.whole(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        check_common(body)
        if not body.messages:
            raise APIError(400, "messages is empty: send at least one user message", param="messages")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        tools, tool_call = offered_tools(body)
        dialog = chat_dialog(body)
        if tools is not None or any(m.role == "tool" or m.tool_calls for m in body.messages):
            problem = tool_dialog_problem(dialog)
            if problem:
                raise APIError(400, f"messages: {problem}", param="messages")
            today = datetime.datetime.now(datetime.timezone.utc).date()
            prompt = encode_tool_dialog(tokenizer, dialog, tools, today)
        else:
            problem = dialog_problem(dialog) or refusal(dialog, config.chat_format)
            if problem:
                raise APIError(400, f"messages: {problem}", param="messages")
            prompt = encode_dialog(tokenizer, dialog, config.chat_format)
        logits = logits_params(body, (body.top_logprobs or 0) if body.logprobs else 0, grammar(body, tool_call))
        names = frozenset(t["function"]["name"] for t in tools or [])
        choices = choices_for(body, prompt, chat_stop_ids(tokenizer, config.chat_format),
                              body.max_completion_tokens or body.max_tokens, "messages", logits, tools=names)
        job = Job(scheduler, choices)
        reply = Reply("chatcmpl", "chat.completion", config.model_name, job, tokenizer, chat=True,
                      logprobs=body.logprobs)
        return reply.stream(body) if body.stream else await reply.whole(request)

    def offered_tools(body: ChatCompletionRequest) -> tuple[list[dict] | None, dict | None]:
        """The tools put in the prompt (None when none are offered), and the JSON schema a tool
        call must follow when tool_choice requires one."""
        choice = body.tool_choice or ("auto" if body.tools else "none")
        if choice != "none" and not body.tools:
            raise APIError(400, "tool_choice: names a tool, or requires one, but no tools were given",
                           param="tool_choice")
        uses_tools = body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages)
        if uses_tools and config.chat_format != "llama3":
            raise APIError(400, "tools: Llama 2 has no tool-call format; tools, tool calls and tool messages need "
                           "a Llama 3.1 or later model", param="tools" if body.tools else "messages")
        if choice == "none":
            return None, None
        tools = [t.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for t in body.tools]
        if choice == "auto":
            return tools, None
        if choice == "required":
            schemas = [tool_call_schema(t) for t in tools]
            return tools, schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice: no tool is named {choice.function.name!r}", param="tool_choice")
        return tools, tool_call_schema(named[0])

    def chat_dialog(body: ChatCompletionRequest) -> list[dict]:
        dialog = []
        for i, m in enumerate(body.messages):
            message = {"role": m.role, "content": m.text()}
            check_text(message["content"], f"messages[{i}].content")
            if m.tool_calls:
                try:
                    calls = [ToolCall(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]
                except ValueError as e:
                    raise APIError(400, f"messages[{i}].tool_calls: arguments are not JSON ({e})",
                                   param=f"messages[{i}].tool_calls") from None
                message["tool_calls"] = calls
            dialog.append(message)
        return dialog

    return app


@dataclass
class Reply:
    """Builds OpenAI's response objects for a job, whole or as a stream of chunks."""

    id_prefix: str
    object: str
    model: str
    job: Job
    tokenizer: Tokenizer
    chat: bool
    logprobs: bool

    def __post_init__(self) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, tokens: list[int], logprobs: list[float], tops: list[tuple[tuple[int, float], ...]],
                  offset: int) -> dict | None:
        if not self.logprobs:
            return None
        piece = functools.lru_cache(maxsize=None)(lambda t: self.tokenizer.decode([t]))
        if self.chat:
            def entry(token: int, logprob: float) -> dict:
                return {"token": piece(token), "logprob": logprob, "bytes": list(piece(token).encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(*alt) for alt in top]}
                                for t, lp, top in zip(tokens, logprobs, tops)]}
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(piece(t))
        alternatives = [{piece(a): v for a, v in top} for top in tops] if any(tops) else None
        return {"tokens": [piece(t) for t in tokens], "token_logprobs": logprobs, "top_logprobs": alternatives,
                "text_offset": offsets}

    async def whole(self, request: HTTPRequest) -> dict:
        texts = [c.prefix for c in self.job.choices]
        # The client may leave while its reply is generated: the engine stops at once, and the
        # request's KV cache is freed within a step (the reply then goes nowhere).
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.job))
        try:
            async for update in self.job.updates():
                texts[update.index] += update.text
        finally:
            watcher.cancel()
            self.job.cancel_unfinished()
        choices = []
        for i, (choice, text) in enumerate(zip(self.job.choices, texts)):
            logprobs = self._logprobs(choice.tokens, choice.logprobs, choice.top_logprobs, len(choice.prefix))
            if not self.chat:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
                continue
            message, finish = {"role": "assistant", "content": text}, choice.finish_reason
            call = parse_tool_call(text, choice.tools) if choice.tools and finish == "stop" else None
            if call is not None:
                message, finish = {"role": "assistant", "content": None, "tool_calls": [_tool_call(call)]}, "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {**self._envelope(choices), "usage": self.job.usage()}

    def stream(self, body: SamplingFields) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The background task runs however the response ends: after the stream, or when the client
        # leaves, even before the stream's first step (a generator never started runs no finally).
        return StreamingResponse(self._chunks(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(self.job.cancel_unfinished))

    def _choice_chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None,
                      role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _tool_call_chunks(self, index: int, call: ToolCall) -> list[dict]:
        """A tool call as OpenAI streams it: id and name first, then the arguments, then the end."""
        whole = _tool_call(call)
        head = {**whole, "index": 0, "function": {"name": call.name, "arguments": ""}}
        pieces = [{"tool_calls": [head]}, {"tool_calls": [{"index": 0, "function": {"arguments": whole["function"]
                                                                                    ["arguments"]}}]}]
        chunks = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in pieces]
        return chunks + [{"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]

    async def _chunks(self, include_usage: bool) -> AsyncIterator[str]:
        offsets = [len(c.prefix) for c in self.job.choices]
        # The updates of a choice that may still turn out to be a tool call are held back until
        # that is known.
        held: list[list[Update] | None] = [[] if c.tools else None for c in self.job.choices]
        try:
            for i, choice in enumerate(self.job.choices):
                if self.chat or choice.prefix:
                    yield _sse(self._envelope([self._choice_chunk(i, choice.prefix, None, None, role=self.chat)],
                                              chunk=True))
            async for u in self.job.updates():
                i, updates = u.index, [u]
                if held[i] is not None:
                    held[i].append(u)
                    text = "".join(h.text for h in held[i])
                    call = parse_tool_call(text, self.job.choices[i].tools) if u.finish_reason == "stop" else None
                    if call is not None:
                        for chunk in self._tool_call_chunks(i, call):
                            yield _sse(self._envelope([chunk], chunk=True))
                        continue
                    if u.finish_reason is None and _may_be_tool_call(text):
                        continue
                    updates, held[i] = held[i], None
                text = "".join(h.text for h in updates)
                tokens = [h for h in updates if h.token is not None]
                logprobs = self._logprobs([h.token for h in tokens], [h.logprob for h in tokens],
                                          [h.top_logprobs for h in tokens], offsets[i]) if tokens else None
                offsets[i] += len(text)
                if text or logprobs or u.finish_reason:
                    yield _sse(self._envelope([self._choice_chunk(i, text, logprobs, u.finish_reason)], chunk=True))
            if include_usage:
                yield _sse({**self._envelope([], chunk=True), "usage": self.job.usage()})
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}})
        finally:
            # A client that went away mid-stream cancels what it no longer reads.
            self.job.cancel_unfinished()
        yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: HTTPRequest, job: Job) -> None:
    """Wait for the client to close the connection (once its body is read, receive() returns
    only then), and cancel what it would have been sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel_unfinished()


def _may_be_tool_call(text: str) -> bool:
    """Whether an answer that starts with `text` may still be a tool call (a JSON object,
    after an optional <|python_tag|>)."""
    start = text.lstrip()
    return not start or start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start)


def _tool_call(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
