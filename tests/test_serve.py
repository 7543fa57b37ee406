"""serve.py at TP=2 over gloo, through real HTTP on 127.0.0.1, as its users reach it: the
official openai client, curl-like raw requests, concurrent clients, disconnects and signals."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from helpers import LLAMA2_TINY, REPO, convert, generate_json, make_meta_checkpoint
from llama.args import ModelArgs
from llama.chat import encode_dialog
from llama.tokenizer import Tokenizer

API_KEY = "test-key"
SLOTS, QUEUE = 4, 4
PROMPTS = ["Four score and seven", "We are met", "It is for us the living, rather, to be dedicated here",
           "The world will little note", "Now we are engaged in a great civil war, testing whether that nation",
           "But", "In a larger sense, we can not dedicate", "that government of the people"]


class Server:
    """A serve.py job under torchrun, listening on a free port."""

    def __init__(self, ckpt: Path, *extra: str, nproc: int = 2) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "serve.py"), "--converted_ckpt_dir", str(ckpt), "--dtype", "float32", "--port", "0",
               "--max_batch_size", str(SLOTS), "--max_queue", str(QUEUE), "--max_seq_len", "128", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=REPO, start_new_session=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve.py ended before listening: {self.proc.stderr.read()}")
            self.lines.append(line)
            found = re.search(r"serving (\S+) at (http://\S+/v1)", line)
            if found:
                self.model, self.url = found.groups()
                return
        raise AssertionError(f"serve.py did not start: {self.lines}")

    def ranks(self) -> list[int]:
        """pids of the worker processes (children of the torchrun launcher)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return children

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return "".join(self.lines) + out, err


def no_rank_traceback(stderr: str) -> bool:
    """torchrun prints its own traceback when signalled; a rank's would name our files."""
    return "/llama/" not in stderr and 'serve.py", line' not in stderr


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except OSError:
        return True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_sp_tokenizer):
    meta = tmp_path_factory.mktemp("serve_meta")
    make_meta_checkpoint(meta, small_sp_tokenizer, **LLAMA2_TINY)
    out = tmp_path_factory.mktemp("serve_dcp") / "tiny"
    convert(meta, out)
    return out


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(ckpt, "--api_key", API_KEY)
    yield srv
    out, err = srv.stop()
    assert srv.proc.returncode is not None and no_rank_traceback(err), err


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """generate.py's greedy completions of PROMPTS, with as many slots as the server."""
    out = tmp_path_factory.mktemp("serve_ref") / "ref.json"
    results = generate_json(ckpt, out, *PROMPTS, nproc=2,
                            extra=("--max_gen_len", "24", "--max_batch_size", str(SLOTS), "--max_seq_len", "128"))
    return {r["prompt"]: r for r in results["results"]}


def raw(server, method: str, path: str, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url.removesuffix("/v1") + path, headers=headers, timeout=60, **kwargs)


def wait_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = raw(server, "GET", "/health").json()
        if (health["running"], health["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_greedy_completion_equals_generate_py(client, server, reference):
    prompt = PROMPTS[0]
    reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, logprobs=1)
    [choice] = reply.choices
    assert choice.text == reference[prompt]["text"]
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(reference[prompt]["prompt_tokens"])
    assert reply.usage.completion_tokens == 24 == len(choice.logprobs.token_logprobs)
    assert choice.logprobs.token_logprobs == pytest.approx(reference[prompt]["logprobs"], abs=1e-4)


def test_concurrent_clients_get_generate_py_texts_and_free_every_slot(client, server, reference):
    """32 requests from 8 clients at once, mixed prompts and lengths, over 4 slots."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + (5 * i) % 21) for i in range(32)]

    def ask(job):
        prompt, max_tokens = job
        return client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                         temperature=0).choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens), choice in zip(jobs, answers):
        expected = Tokenizer(server_tokenizer(server)).decode(reference[prompt]["tokens"][:max_tokens])
        assert choice.text == expected, (prompt, max_tokens)
    assert wait_idle(server) == {"status": "ok", "running": 0, "waiting": 0}
    metrics = raw(server, "GET", "/metrics").text
    assert re.search(r"^tp_llama:num_requests_running 0\.0$", metrics, re.M)
    assert re.search(r"^tp_llama:time_to_first_token_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^tp_llama:generation_tokens_total [1-9]", metrics, re.M)


def server_tokenizer(server) -> Path:
    return Path(server.proc.args[server.proc.args.index("--converted_ckpt_dir") + 1]) / "tokenizer.model"


def test_prompt_list_streaming_and_echo(client, server, reference):
    prompts = PROMPTS[1:3]
    whole = client.completions.create(model=server.model, prompt=prompts, max_tokens=10, temperature=0, echo=True)
    assert [c.text for c in whole.choices] == [p + reference[p]["text"][:len(c.text) - len(p)]
                                              for p, c in zip(prompts, whole.choices)]
    texts = ["", ""]
    usage = None
    for chunk in client.completions.create(model=server.model, prompt=prompts, max_tokens=10, temperature=0,
                                           echo=True, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]
    assert usage.completion_tokens == 20 and usage.total_tokens == usage.prompt_tokens + 20


def test_stop_strings_are_cut_and_never_streamed(client, server, reference):
    prompt = PROMPTS[4]
    text = reference[prompt]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0,
                                      stop=[stop, "never appears"])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    pieces = [c.choices[0].text for c in client.completions.create(
        model=server.model, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected


def test_chat_streamed_and_whole(client, server, ckpt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Four score?"}]
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0,
                                           logprobs=True)
    choice = whole.choices[0]
    tokenizer = Tokenizer(ckpt / "tokenizer.model")
    assert whole.usage.prompt_tokens == len(encode_dialog(tokenizer, messages, "llama2"))
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    streamed, usage, roles = "", None, []
    for chunk in client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed += c.delta.content or ""
            roles.append(c.delta.role)
        usage = chunk.usage or usage
    assert streamed == choice.message.content and roles[0] == "assistant"
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_is_reproducible(client, server):
    def sample(seed):
        return client.completions.create(model=server.model, prompt=PROMPTS[2], max_tokens=16, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_models_health_and_errors(server):
    models = raw(server, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [server.model]
    assert raw(server, "GET", "/health").status_code == 200

    def error(response, status):
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body["message"]

    completions = lambda body, **kw: raw(server, "POST", "/v1/completions", json={"model": server.model, **body}, **kw)
    assert "401" not in error(raw(server, "GET", "/v1/models", key=None), 401)
    error(raw(server, "GET", "/v1/models", key="wrong"), 401)
    message = error(completions({"prompt": "word " * 200}), 400)
    assert re.search(r"\d+ tokens.*max_seq_len is 128", message)
    assert "n: " in error(completions({"prompt": "hi", "n": 17}), 400)
    assert "empty" in error(completions({"prompt": ""}), 400)
    assert "max_tokens" in error(completions({"prompt": "hi", "max_tokens": "many"}), 400)
    assert "temperature" in error(completions({"prompt": "hi", "temperature": -1}), 400)
    error(completions({"prompt": "hi", "model": "gpt-4"}), 404)
    error(raw(server, "POST", "/v1/chat/completions", json={"messages": []}), 400)
    assert "INST" in error(raw(server, "POST", "/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "[INST] hi"}]}), 400)
    error(raw(server, "GET", "/v1/nothing"), 404)


def test_disconnect_frees_the_slot_while_others_stream_and_a_full_queue_gets_503(server):
    url = server.url + "/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", url, headers=headers, timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": 100, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        # Bad requests are refused while this one streams.
        assert raw(server, "POST", "/v1/completions", json={"prompt": "hi", "n": 0}).status_code == 400
        assert next(lines) is not None
    assert wait_idle(server) == {"status": "ok", "running": 0, "waiting": 0}

    long_request = {"model": server.model, "prompt": PROMPTS[5], "max_tokens": 100, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(SLOTS + QUEUE + 6) as pool:
        responses = list(pool.map(lambda _: raw(server, "POST", "/v1/completions", json=long_request),
                                  range(SLOTS + QUEUE + 6)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["Retry-After"] for r in busy)
    assert all(r.status_code in (200, 503) for r in responses)
    assert wait_idle(server)["running"] == 0


def test_sigterm_stops_every_rank_cleanly(ckpt):
    srv = Server(ckpt)
    ranks = srv.ranks()
    assert len(ranks) == 2
    start = time.monotonic()
    out, err = srv.stop(signal.SIGTERM)
    assert all(gone(pid) for pid in ranks) and time.monotonic() - start < 30
    assert "server stopped" in out and no_rank_traceback(err), err


def test_a_killed_rank_ends_the_others(ckpt):
    srv = Server(ckpt)
    ranks = srv.ranks()
    os.kill(max(ranks), signal.SIGKILL)  # the rank that is not 0 (started second)
    start = time.monotonic()
    srv.proc.wait(timeout=60)
    assert time.monotonic() - start < 60 and all(gone(pid) for pid in ranks)
    assert srv.proc.returncode != 0


def test_load_generator_reports_throughput_and_latency(server, tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--serve", server.url, "--api_key", API_KEY,
                             "--concurrency", "1,3", "--requests", "3", "--prompt_len", "9", "--gen_len", "5",
                             "--output_json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["results"]
    assert [(r["concurrency"], r["requests"]) for r in runs] == [(1, 3), (3, 3)]
    for r in runs:
        assert r["output_tokens_per_s"] > 0 and r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["inter_token_ms"]["p50"] > 0
    assert "concurrency 3:" in result.stdout


def test_llama2_has_no_tool_format(client, server):
    """Tools need Llama 3.1's format: a Llama 2 model refuses them with a 400 naming the field."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert info.value.body["param"] == "tools" and "Llama 2 has no tool-call format" in info.value.body["message"]
