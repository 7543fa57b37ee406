"""The OpenAI-compatible HTTP API (FastAPI), served by rank 0 in front of the engine loop.

Handlers validate and tokenize a request, hand it to the `Scheduler`, and turn the token
events that come back into OpenAI's response objects, or into server-sent event chunks when
streamed. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from llama.chat import ChatFormat, chat_stop_ids, dialog_problem, encode_dialog, refusal
from llama.generation import FINISH_CANCELLED, Request, SamplingParams, TokenEvent
from llama.serving import QueueFull, Scheduler, ServerStopping, TextStream
from llama.tokenizer import Tokenizer

RETRY_AFTER_S = 1


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
    n: int = 1


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only 0: the chosen token's logprob is returned")


# ---------------------------------------------------------------------------------------
# One request's choices as they are generated


@dataclass
class Choice:
    """One prompt of a request: its engine request, text so far and how it ended."""

    request: Request
    text: TextStream
    prefix: str = ""  # the echoed prompt
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Update:
    """What one event added to a choice: text to send, the token and its logprob."""

    index: int
    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None


class Job:
    """The choices of one HTTP request and the events that advance them."""

    def __init__(self, scheduler: Scheduler, choices: list[Choice]) -> None:
        self.scheduler = scheduler
        self.choices = choices
        self.index = {c.request.id: i for i, c in enumerate(choices)}
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
            text = choice.text.add(event.token)
        finish = event.finish_reason
        if choice.text.stopped:
            finish = "stop"
            if event.finish_reason is None:
                self.scheduler.cancel(choice.request.id)
        if finish is not None:
            text += choice.text.finish()
            choice.finish_reason = "stop" if finish == FINISH_CANCELLED else finish
        return Update(i, text, event.token, event.logprob, choice.finish_reason)

    def cancel_unfinished(self) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                self.scheduler.cancel(choice.request.id)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.request.prompt) for c in self.choices)
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
    api_key: str | None = None


def create_app(config: ServerConfig, scheduler: Scheduler) -> FastAPI:
    app = FastAPI(title="tp-llama", docs_url=None, redoc_url=None)
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
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=str(error.status_code)))

    def authorize(request: HTTPRequest) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY' with the server's "
                           "--api_key", code="invalid_api_key")

    def check_common(body: SamplingFields) -> None:
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{config.model_name}'",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n {body.n}: this server returns one choice per prompt; use n=1", param="n")

    def stop_strings(body: SamplingFields) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def choice_for(body: SamplingFields, prompt: list[int], stop_ids: frozenset[int], max_tokens: int | None,
                   what: str, prefix: str = "") -> Choice:
        if not prompt:
            raise APIError(400, f"{what} is empty", param=what.split("[")[0])
        room = config.max_seq_len - len(prompt)
        if room <= 0:
            raise APIError(400, f"{what} has {len(prompt)} tokens, but this server's max_seq_len is "
                           f"{config.max_seq_len} (a prompt must leave room for at least one new token); "
                           "shorten it", param=what.split("[")[0], code="context_length_exceeded")
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        sampling = SamplingParams(body.temperature, body.top_p, seed % 2**63)
        request = Request(scheduler.new_id(), prompt, min(max_tokens or room, room), stop_ids, sampling)
        return Choice(request, TextStream(tokenizer, stop_strings(body)), prefix)

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

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "tp-llama",
                "max_model_len": config.max_seq_len, "vocab_size": tokenizer.n_words}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest):
        check_common(body)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
            else [body.prompt]
        choices = []
        for i, prompt in enumerate(prompts):
            what = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            if isinstance(prompt, str):
                tokens = tokenizer.encode(prompt, bos=True) if prompt else []
                text = prompt
            else:
                validate_token_ids(prompt, what)
                tokens, text = list(prompt), tokenizer.decode(list(prompt))
            choices.append(choice_for(body, tokens, tokenizer.stop_ids, body.max_tokens, what,
                                      prefix=text if body.echo else ""))
        job = Job(scheduler, choices)
        reply = Reply("cmpl", "text_completion", config.model_name, job, tokenizer, chat=False,
                      logprobs=body.logprobs is not None)
        return reply.stream(body) if body.stream else await reply.whole()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest):
        check_common(body)
        if not body.messages:
            raise APIError(400, "messages is empty: send at least one user message", param="messages")
        dialog = [{"role": m.role, "content": m.text()} for m in body.messages]
        problem = dialog_problem(dialog) or refusal(dialog, config.chat_format)
        if problem:
            raise APIError(400, f"messages: {problem}", param="messages")
        prompt = encode_dialog(tokenizer, dialog, config.chat_format)
        choice = choice_for(body, prompt, chat_stop_ids(tokenizer, config.chat_format),
                            body.max_completion_tokens or body.max_tokens, "messages")
        job = Job(scheduler, [choice])
        reply = Reply("chatcmpl", "chat.completion", config.model_name, job, tokenizer, chat=True,
                      logprobs=body.logprobs)
        return reply.stream(body) if body.stream else await reply.whole()

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

    def _logprobs(self, tokens: list[int], logprobs: list[float], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        pieces = [self.tokenizer.decode([t]) for t in tokens]
        if self.chat:
            return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []}
                                for p, lp in zip(pieces, logprobs)]}
        offsets = []
        for p in pieces:
            offsets.append(offset)
            offset += len(p)
        return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}

    async def whole(self) -> dict:
        texts = [c.prefix for c in self.job.choices]
        async for update in self.job.updates():
            texts[update.index] += update.text
        choices = []
        for i, (choice, text) in enumerate(zip(self.job.choices, texts)):
            logprobs = self._logprobs(choice.tokens, choice.logprobs, len(choice.prefix))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        return {**self._envelope(choices), "usage": self.job.usage()}

    def stream(self, body: SamplingFields) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._chunks(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _choice_chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None,
                      role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def _chunks(self, include_usage: bool) -> AsyncIterator[str]:
        offsets = [len(c.prefix) for c in self.job.choices]
        try:
            for i, choice in enumerate(self.job.choices):
                if self.chat or choice.prefix:
                    yield _sse(self._envelope([self._choice_chunk(i, choice.prefix, None, None, role=self.chat)],
                                              chunk=True))
            async for u in self.job.updates():
                tokens = [u.token] if u.token is not None else []
                logprobs = self._logprobs(tokens, [u.logprob] if tokens else [], offsets[u.index]) if tokens else None
                offsets[u.index] += len(u.text)
                if u.text or logprobs or u.finish_reason:
                    yield _sse(self._envelope([self._choice_chunk(u.index, u.text, logprobs, u.finish_reason)],
                                              chunk=True))
            if include_usage:
                yield _sse({**self._envelope([], chunk=True), "usage": self.job.usage()})
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}})
        finally:
            # A client that went away mid-stream cancels what it no longer reads.
            self.job.cancel_unfinished()
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
