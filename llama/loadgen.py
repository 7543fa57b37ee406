"""A load generator for serve.py (benchmark.py --serve URL): up to N requests in flight at once,
sent back to back or arriving at a given mean rate (Poisson, like vLLM's benchmark_serving),
each a streamed completion whose tokens are timed as they arrive.

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
                      headers: dict[str, str]) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": gen_len, "temperature": 0, "stream": True,
            "logprobs": 0}
    timing = RequestTiming(time.perf_counter())
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
               seed: int, request_rate: float) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        try:
            models = (await client.get(url + "/models", headers=headers)).json()["data"][0]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise UserError(f"--serve {url}: no OpenAI-compatible server answers there ({e})") from None
        rng = random.Random(seed)
        vocab = min(models.get("vocab_size", 32000), 32000)
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(requests)]
        slots = asyncio.Semaphore(concurrency)
        timings: list[RequestTiming] = []

        async def send(prompt: list[int]) -> None:
            async with slots:
                timings.append(await _stream_one(client, url, models["id"], prompt, gen_len, headers))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(send(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    tokens = sum(len(t.token_times) for t in timings)
    ttft = [t.ttft_s for t in timings if t.token_times]
    itl = [s for t in timings for s in t.inter_token_s]
    return {
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "requests": len(timings),
        "prompt_len": prompt_len, "gen_len": gen_len,
        "wall_s": wall, "requests_per_s": len(timings) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": 1e3 * statistics.median(ttft), "p99": 1e3 * _percentile(ttft, 99)},
        "inter_token_ms": {"p50": 1e3 * statistics.median(itl), "p99": 1e3 * _percentile(itl, 99)},
    }


def run_load(url: str, concurrency: int, requests: int, prompt_len: int, gen_len: int, api_key: str | None = None,
             seed: int = 0, request_rate: float = float("inf")) -> dict[str, object]:
    """Throughput and latency of `requests` streamed completions, at most `concurrency` at once,
    arriving `request_rate` per second on average (all at once if infinite)."""
    return asyncio.run(_run(url.rstrip("/"), concurrency, requests, prompt_len, gen_len, api_key, seed,
                            request_rate))
