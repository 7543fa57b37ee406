"""A load generator for serve.py (benchmark.py --serve URL): up to N requests in flight at once,
sent back to back or arriving at a given mean rate (Poisson, like vLLM's benchmark_serving),
each a streamed completion whose tokens are timed as they arrive. Two probes of the engine:
prompts that share their first tokens (the prefix cache: the first request's time to first
token against the others'), and one long prompt sent while the streams decode (chunked prefill:
the streams' largest gap between tokens while it is prefilled against their median gap).

Prompts are random token ids (the server accepts them as OpenAI's API does), so the load
does not depend on a tokenizer on the client side and prompt lengths are exact. Each
request asks for logprobs, which makes the server send one chunk per token."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from llama.errors import UserError


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def _stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], gen_len: int,
                      headers: dict[str, str], timing: RequestTiming | None = None,
                      guided_json: dict | None = None) -> RequestTiming:
    """Stream one completion, its token times appended to `timing` (a new one by default) as they
    come; constrained to the JSON schema `guided_json` if given."""
    body = {"model": model, "prompt": prompt, "max_tokens": gen_len, "temperature": 0, "stream": True,
            "logprobs": 0, **({"guided_json": guided_json} if guided_json is not None else {})}
    timing = timing or RequestTiming(time.perf_counter())
    timing.start = time.perf_counter()
    async with client.stream("POST", url + "/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise UserError(f"--serve {url}: HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise UserError(f"--serve {url}: the server failed a request: {chunk['error']['message']}")
            for choice in chunk["choices"]:
                if choice.get("logprobs") and choice["logprobs"]["tokens"]:
                    timing.token_times.append(time.perf_counter())
    return timing


async def _run(url: str, concurrency: int, requests: int, prompt_len: int, gen_len: int, api_key: str | None,
               seed: int, request_rate: float, shared_prefix: int, long_prompt: int,
               guided_json: dict | None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        try:
            models = (await client.get(url + "/models", headers=headers)).json()["data"][0]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise UserError(f"--serve {url}: no OpenAI-compatible server answers there ({e})") from None
        rng = random.Random(seed)
        vocab = min(models.get("vocab_size", 32000), 32000)
        prefix = [rng.randrange(vocab) for _ in range(shared_prefix)]
        prompts = [prefix + [rng.randrange(vocab) for _ in range(prompt_len - shared_prefix)] for _ in range(requests)]
        slots = asyncio.Semaphore(concurrency)
        timings = [RequestTiming(0.0) for _ in prompts]  # in the order sent

        async def send(prompt: list[int], timing: RequestTiming) -> None:
            async with slots:
                await _stream_one(client, url, models["id"], prompt, gen_len, headers, timing, guided_json)

        async def send_long() -> RequestTiming:
            """Once the first streams decode, one long prompt (a token back is enough)."""
            while sum(len(t.token_times) > 1 for t in timings) < min(concurrency, requests):
                await asyncio.sleep(0.01)
            return await _stream_one(client, url, models["id"], [rng.randrange(vocab) for _ in range(long_prompt)],
                                     1, headers)

        start = time.perf_counter()
        tasks = []
        long_task = asyncio.create_task(send_long()) if long_prompt else None
        for prompt, timing in zip(prompts, timings):
            tasks.append(asyncio.create_task(send(prompt, timing)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        long_timing = await long_task if long_task else None
    tokens = sum(len(t.token_times) for t in timings)
    ttft = [t.ttft_s for t in timings if t.token_times]
    itl = [s for t in timings for s in t.inter_token_s]
    result = {
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "requests": len(timings),
        "prompt_len": prompt_len, "gen_len": gen_len,
        "wall_s": wall, "requests_per_s": len(timings) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": 1e3 * statistics.median(ttft), "p99": 1e3 * _percentile(ttft, 99)},
        "inter_token_ms": {"p50": 1e3 * statistics.median(itl), "p99": 1e3 * _percentile(itl, 99)},
    }
    if shared_prefix:
        result["shared_prefix"] = {"tokens": shared_prefix, "first_ttft_ms": 1e3 * ttft[0],
                                   "later_ttft_ms_p50": 1e3 * statistics.median(ttft[1:]) if ttft[1:] else None}
    if long_timing:
        result["long_prompt"] = _long_prompt_figures(long_timing, long_prompt, timings)
    return result


def _long_prompt_figures(long: RequestTiming, tokens: int, streams: list[RequestTiming]) -> dict[str, float]:
    """The streams' largest gap between two tokens that overlaps the long prompt's prefill (from
    its sending to its first token), against their median gap over the whole run."""
    begin, end = long.start, long.token_times[0]
    during = [b - a for t in streams for a, b in zip(t.token_times, t.token_times[1:]) if b > begin and a < end]
    gaps = [s for t in streams for s in t.inter_token_s]
    return {"tokens": tokens, "ttft_ms": 1e3 * long.ttft_s, "streams_max_gap_ms": 1e3 * max(during, default=0.0),
            "streams_median_gap_ms": 1e3 * statistics.median(gaps)}


def run_load(url: str, concurrency: int, requests: int, prompt_len: int, gen_len: int, api_key: str | None = None,
             seed: int = 0, request_rate: float = float("inf"), shared_prefix: int = 0,
             long_prompt: int = 0, guided_json: dict | None = None) -> dict[str, object]:
    """Throughput and latency of `requests` streamed completions, at most `concurrency` at once,
    arriving `request_rate` per second on average (all at once if infinite). Their prompts share
    their first `shared_prefix` tokens; with `long_prompt`, one more prompt of that many tokens
    is sent once the first streams decode; with `guided_json`, each is constrained to that
    JSON schema."""
    return asyncio.run(_run(url.rstrip("/"), concurrency, requests, prompt_len, gen_len, api_key, seed,
                            request_rate, shared_prefix, long_prompt, guided_json))
