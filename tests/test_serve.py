"""serve.py at TP=2 over gloo, through real HTTP on 127.0.0.1, as its users reach it: the
official openai client, curl-like raw requests, concurrent clients, disconnects and signals."""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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

    def __init__(self, ckpt: Path | None, *extra: str, nproc: int = 2, env: dict[str, str] | None = None) -> None:
        """Serves `ckpt`, or the demo (--demo) when it is None."""
        source = ["--converted_ckpt_dir", str(ckpt)] if ckpt else ["--demo"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "serve.py"), *source, "--dtype", "float32", "--port", "0",
               "--max_batch_size", str(SLOTS), "--max_queue", str(QUEUE), "--max_seq_len", "128", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
               **(env or {})}
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


# A KV cache smaller than max_seq_len (7 blocks of 16 tokens): SLOTS requests at once overflow
# it, so the engine preempts and recomputes sequences.
POOL_TOKENS = 112


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("serve_key") / "key"
    key_file.write_text(API_KEY + "\n")
    srv = Server(ckpt, "--api_key_file", str(key_file), "--kv_cache_tokens", str(POOL_TOKENS))
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
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kwargs.pop("headers", {})}
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
    """32 requests from 8 clients at once, mixed prompts and lengths, 4 at a time in a pool that
    holds fewer (preempted and recomputed), repeated prompts from the prefix cache: the texts of
    generate.py, which ran each prompt once with room for all."""
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
    assert re.search(r"^tp_llama:kv_cache_usage_perc 0\.0$", metrics, re.M)
    assert re.search(r"^tp_llama:num_preemptions_total [1-9]", metrics, re.M)
    assert re.search(r"^tp_llama:prefix_cache_hits_total [1-9]", metrics, re.M)
    assert re.search(r"^tp_llama:prefix_cache_queries_total [1-9]", metrics, re.M)


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
    message = error(completions({"prompt": [5] * 120}), 400)  # within max_seq_len, not within the pool
    assert f"120 tokens, but this server's KV cache holds {POOL_TOKENS} tokens" in message
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

    # Fill the server (SLOTS running, QUEUE waiting: long answers that ignore the end token and
    # cannot all fit the pool), then one more arrives: a 503. One that ends before the server is
    # full (a loaded host delays the last senders) is replaced; one that ends between the look
    # at /health and the extra request's arrival lets the extra in (a 200, which is right): then
    # the server is filled again and another extra sent.
    long_request = {"model": server.model, "prompt": PROMPTS[5], "max_tokens": 100, "temperature": 0,
                    "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(4 * (SLOTS + QUEUE)) as pool:
        answers: list[concurrent.futures.Future] = []
        for _ in range(5):
            deadline = time.monotonic() + 30
            while sum(raw(server, "GET", "/health").json()[k] for k in ("running", "waiting")) < SLOTS + QUEUE:
                assert time.monotonic() < deadline and len(answers) < 12 * (SLOTS + QUEUE), "the server never filled"
                in_flight = sum(not a.done() for a in answers)
                answers += [pool.submit(raw, server, "POST", "/v1/completions", json=long_request)
                            for _ in range(SLOTS + QUEUE - in_flight)]
                time.sleep(0.01)  # rank 0's HTTP thread shares the GIL with its engine loop
            extra = raw(server, "POST", "/v1/completions", json=long_request)
            if extra.status_code != 200:
                break
        assert extra.status_code == 503 and extra.headers["Retry-After"], extra.text
        assert [a.result().status_code for a in answers] == [200] * len(answers)
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
                             "--concurrency", "1,3", "--requests", "3", "--prompt_len", "20", "--gen_len", "5",
                             "--shared_prefix", "16", "--long_prompt", "40", "--output_json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["results"]
    assert [(r["concurrency"], r["requests"]) for r in runs] == [(1, 3), (3, 3)]
    for r in runs:
        assert r["output_tokens_per_s"] > 0 and r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["inter_token_ms"]["p50"] > 0
        assert r["shared_prefix"]["tokens"] == 16 and r["shared_prefix"]["later_ttft_ms_p50"] > 0
        long = r["long_prompt"]
        assert long["tokens"] == 40 and long["ttft_ms"] > 0 and long["streams_max_gap_ms"] >= 0
    assert "concurrency 3:" in result.stdout and "a 40-token prompt" in result.stdout


def test_llama2_has_no_tool_format(client, server):
    """Tools need Llama 3.1's format: a Llama 2 model refuses them with a 400 naming the field."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert info.value.body["param"] == "tools" and "Llama 2 has no tool-call format" in info.value.body["message"]


def test_constrained_decoding_needs_a_vocabulary_that_spells_any_text(client, server):
    """This tokenizer has no byte pieces: JSON's "{" is not in it, so a grammar would leave no
    token to sample. The request is refused, naming the field, rather than answered in free text."""
    for kwargs, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"extra_body": {"guided_regex": "[0-9]+"}}, "guided_regex")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert info.value.body["param"] == param and "no byte pieces" in info.value.body["message"]


def exchange(server, request: bytes) -> bytes:
    """Send raw HTTP request bytes on a socket of their own (from a thread, so that an answer
    that comes before all of them are sent is read); the answer."""
    host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        def send() -> None:
            try:
                sock.sendall(request)
            except OSError:  # the server answered and closed first
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        while length and len(body) < int(length[1]) and (chunk := sock.recv(65536)):
            body += chunk
    return head + b"\r\n\r\n" + body


def post_head(server, length: int | str, key: str | None = None, host: str | None = None) -> bytes:
    netloc = server.url.removeprefix("http://").removesuffix("/v1")
    lines = [b"POST /v1/completions HTTP/1.1", b"Host: " + (host or netloc).encode(), b"Content-Type: application/json",
             (b"Content-Length: %d" % length) if isinstance(length, int) else b"Transfer-Encoding: chunked"]
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_keys_hosts_and_sizes_are_checked_before_the_body(server):
    """The gate answers from the headers alone: a 40 MB body is refused before a byte of it is
    sent, for want of a key (401) or for its size (413); malformed JSON without a key is 401."""
    for key, status in ((None, b"401"), ("wrong", b"401"), (API_KEY, b"413")):
        answer = exchange(server, post_head(server, 40_000_000, key))
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"larger than this server's limit of 8388608 bytes" in answer
    assert raw(server, "POST", "/v1/completions", key=None, content=b"{not json").status_code == 401
    # A chunked body (no declared length) is cut at the limit.
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in (8 << 20, 1)) + b"0\r\n\r\n"
    answer = exchange(server, post_head(server, "chunked", API_KEY) + body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # DNS rebinding: a page served from another name reaches 127.0.0.1 with its own Host.
    answer = exchange(server, post_head(server, 2, API_KEY, host="attacker.example:8000") + b"{}")
    assert answer.startswith(b"HTTP/1.1 400") and b"invalid_host" in answer, answer[:300]
    assert raw(server, "GET", "/health").status_code == 200  # 127.0.0.1:PORT, as every client sends it


def test_bounded_stop_lone_surrogates_and_impossible_prompt_lists_are_400(server):
    def status(body):
        response = raw(server, "POST", "/v1/completions", content=json.dumps({"max_tokens": 2, **body}).encode(),
                       headers={"Content-Type": "application/json"})
        return response.status_code, response.json()["error"]["message"] if response.status_code != 200 else ""

    assert status({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}) == \
        (400, "stop: at most 4 strings of at most 256 characters each")
    assert status({"prompt": "hi", "stop": "x" * 257})[0] == 400
    assert status({"prompt": "hi", "stop": ["a", "b", "c", "x" * 256]})[0] == 200
    code, message = status({"prompt": "half a pair: \ud800"})  # json.dumps writes it as \\ud800
    assert code == 400 and message.startswith("prompt: not valid Unicode (a lone surrogate '\\ud800'")
    code, message = status({"prompt": ["hi"] * (SLOTS + QUEUE + 1)})
    assert code == 400 and f"more than this server ever holds at once ({SLOTS + QUEUE}" in message


def test_api_key_sources(tmp_path, monkeypatch):
    import serve
    from llama.errors import UserError

    def key(api_key=None, api_key_file=None):
        return serve.api_key(argparse.Namespace(api_key=api_key, api_key_file=api_key_file))

    monkeypatch.delenv("LLAMA_API_KEY", raising=False)
    assert key() is None
    monkeypatch.setenv("LLAMA_API_KEY", "from-env")
    assert key() == "from-env" and key(api_key="flag") == "flag"
    (tmp_path / "key").write_text("from-file\n")
    assert key(api_key_file=tmp_path / "key") == "from-file"
    for empty in (dict(api_key=""), dict(api_key_file=tmp_path / "empty")):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(UserError, match="the API key is empty"):
            key(**empty)
    monkeypatch.setenv("LLAMA_API_KEY", "")
    with pytest.raises(UserError, match="^LLAMA_API_KEY: the API key is empty"):
        key()
    with pytest.raises(UserError, match="not both"):
        key(api_key="a", api_key_file=tmp_path / "key")
    assert [serve.is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1", "example.org")] \
        == [True, True, True, False, False, False]


def finished(server) -> dict[str, float]:
    """Requests finished so far, by reason (from /metrics)."""
    text = raw(server, "GET", "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'request_success_total\{finished_reason="(\w+)"\} (\S+)', text)}


def test_a_client_that_leaves_cancels_its_request_in_every_path(server):
    """A whole (non-streamed) reply whose client closes its socket while it is generated, and
    streams whose clients close before they start (right after sending, at several delays: the
    server may see the close before it reads the body, before the stream's first step or
    during it): each is cancelled or never started, none runs on to max_tokens, and the slots
    are free at once."""
    eos = Tokenizer(server_tokenizer(server)).eos_id  # never chosen: each would run to max_tokens
    body = json.dumps({"prompt": PROMPTS[5], "max_tokens": 120, "temperature": 0,
                       "logit_bias": {str(eos): -100}}).encode()
    streamed = body[:-1] + b', "stream": true}'
    host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    before = finished(server)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(post_head(server, len(body), API_KEY) + body)
        deadline = time.monotonic() + 30
        while raw(server, "GET", "/health").json()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while finished(server).get("cancelled", 0) == before.get("cancelled", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished(server) == {**before, "cancelled": before.get("cancelled", 0) + 1}
    for delay in (0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(post_head(server, len(streamed), API_KEY) + streamed)
            time.sleep(delay)
    assert wait_idle(server, timeout=5) == {"status": "ok", "running": 0, "waiting": 0}
    after = finished(server)
    assert {k: v for k, v in after.items() if k != "cancelled"} == {k: v for k, v in before.items() if k != "cancelled"}


def test_load_and_abuse(server, reference):
    """16 clients send 32 well-formed requests (retrying a 503 after Retry-After) while 4 others
    send oversize bodies, wrong keys, malformed JSON, giant stop lists and requests they leave
    mid-way: every well-formed request gets generate.py's greedy text, every bad one its 4xx,
    and then nothing runs, waits or holds a slot."""
    tokenizer = Tokenizer(server_tokenizer(server))
    jobs = [(PROMPTS[i % len(PROMPTS)], 2 + (7 * i) % 13) for i in range(32)]
    stop = threading.Event()

    def ask(job):
        prompt, max_tokens = job
        while True:
            r = raw(server, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                             "temperature": 0})
            if r.status_code != 503:
                return r
            time.sleep(float(r.headers["Retry-After"]) / 10)

    def leave_mid_way() -> int:
        body = json.dumps({"prompt": PROMPTS[4], "max_tokens": 100}).encode()
        host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(post_head(server, len(body), API_KEY) + body)
            time.sleep(0.05)
        return 0

    def status_of(answer: bytes) -> int:
        return int(answer.split(b" ", 2)[1])

    abuse = [(lambda: status_of(exchange(server, post_head(server, 40_000_000, API_KEY))), 413),
             (lambda: raw(server, "POST", "/v1/completions", key="wrong", json={"prompt": "hi"}).status_code, 401),
             (lambda: raw(server, "POST", "/v1/completions", content=b'{"prompt": "hi",',
                          headers={"Content-Type": "application/json"}).status_code, 400),
             (lambda: raw(server, "POST", "/v1/completions", json={"prompt": "hi", "stop": ["x" * 20_000] * 10})
              .status_code, 400),
             (leave_mid_way, 0)]

    def abuser(offset: int) -> list[tuple[int, int]]:
        seen = []
        for i in itertools.count(offset):
            if stop.is_set():
                return seen
            send, expected = abuse[i % len(abuse)]
            seen.append((send(), expected))

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        abusers = [pool.submit(abuser, k) for k in range(4)]
        answers = list(pool.map(ask, jobs))  # 16 clients at a time
        stop.set()
        abused = [pair for future in abusers for pair in future.result()]
    assert len(abused) >= 10 and all(got == expected for got, expected in abused), abused
    for (prompt, max_tokens), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        expected = tokenizer.decode(reference[prompt]["tokens"][:max_tokens])
        assert answer.json()["choices"][0]["text"] == expected, (prompt, max_tokens)
    assert wait_idle(server) == {"status": "ok", "running": 0, "waiting": 0}
    metrics = raw(server, "GET", "/metrics").text
    assert re.search(r"^tp_llama:num_requests_running 0\.0$", metrics, re.M)
    assert re.search(r"^tp_llama:num_requests_waiting 0\.0$", metrics, re.M)
