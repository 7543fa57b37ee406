"""Serve a tensor-parallel Llama behind an OpenAI-compatible HTTP API, with continuous batching.

    torchrun --nproc_per_node K serve.py --converted_ckpt_dir OUT [--port 8000]
    torchrun --nproc_per_node 2 serve.py --demo
    torchrun --nproc_per_node 1 serve.py --random_weights llama3.2-1b --tokenizer_path tokenizer.model

Rank 0 answers HTTP (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health,
/metrics) and schedules; every rank runs the model. SIGINT or SIGTERM stops every rank cleanly.
"""

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from llama import benchmarking as bench
from llama.chat import CHAT_FORMATS, resolve_chat_format
from llama.checkpoint import DEFAULT_DTYPE, DTYPES, load_converted
from llama.demo import ensure_demo_checkpoint
from llama.distributed import Runtime, add_timeout_argument, init_runtime, log, run_cli
from llama.errors import UserError
from llama.engine import Engine, use_compiled_decode
from llama.engine.options import add_engine_arguments, check_engine_arguments, describe_pool, engine_config
from llama.model import Transformer
from llama.serving import Metrics, Scheduler, longest_prompt, run_engine_loop, warm_up
from llama.tokenizer import Tokenizer

# Where the API key may come from instead of --api_key (which every user sees in ps).
API_KEY_ENV = "LLAMA_API_KEY"
# Request bodies larger than this are refused (413) before they are read: a prompt of 128k
# tokens is under 1 MB as token ids and a few MB as text.
DEFAULT_MAX_BODY_BYTES = 8 << 20
# How long rank 0 waits for the web server's thread to come up or to stop.
SERVER_THREAD_WAIT_S = 10.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("model (one of)")
    source.add_argument("--converted_ckpt_dir", type=Path, help="output of convert_checkpoints.py")
    source.add_argument("--demo", action="store_true", help="the built-in demo model (built once)")
    source.add_argument("--random_weights", metavar="SHAPE", help=f"random weights of a Llama shape, for load "
                        f"tests: {', '.join(bench.SHAPES)} (needs --tokenizer_path of that vocabulary)")
    p.add_argument("--tokenizer_path", type=Path, help="default: the tokenizer.model stored with the checkpoint")
    p.add_argument("--model_args", type=Path, help="default: model_args.json in --converted_ckpt_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--model_name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--max_batch_size", type=int, help="most requests running at once (default: model_args.json)")
    p.add_argument("--max_seq_len", type=int, help="longest prompt + completion; reserves nothing (default: "
                   "model_args.json, or the shape's context with --random_weights)")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait to be admitted; more get 503")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiled at start)")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1 routes (visible in ps: prefer "
                   f"--api_key_file or {API_KEY_ENV})")
    p.add_argument("--api_key_file", type=Path, help=f"read the API key from this file (else ${API_KEY_ENV})")
    p.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413 before they are read (default: %(default)s)")
    p.add_argument("--chat_format", choices=CHAT_FORMATS, help="default: the tokenizer's family")
    add_engine_arguments(p)
    add_timeout_argument(p)
    args = p.parse_args()
    check_engine_arguments(args)
    if sum(map(bool, (args.converted_ckpt_dir, args.demo, args.random_weights))) != 1:
        raise UserError("pass one of --converted_ckpt_dir DIR, --demo or --random_weights SHAPE")
    if args.random_weights and not args.tokenizer_path:
        raise UserError("--random_weights needs --tokenizer_path: a tokenizer.model of the shape's vocabulary")
    for flag in ("max_batch_size", "max_seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: use a positive number")
    if args.max_queue < 0:
        raise UserError(f"--max_queue {args.max_queue}: use 0 or more")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: use a port number in [0, 65535]")
    if args.max_body_bytes < 1:
        raise UserError(f"--max_body_bytes {args.max_body_bytes}: use a positive number")
    args.api_key = api_key(args)
    return args


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api_key, --api_key_file or $LLAMA_API_KEY (one of them), or None; an empty
    key is an error, not "no key" (an unset variable in `--api_key "$KEY"` would turn auth off)."""
    given = [(flag, value) for flag, value in (("--api_key", args.api_key), ("--api_key_file", args.api_key_file))
             if value is not None]
    if len(given) > 1:
        raise UserError("pass --api_key or --api_key_file, not both")
    if given and given[0][0] == "--api_key_file":
        try:
            key, source = args.api_key_file.read_text().strip(), f"--api_key_file {args.api_key_file}"
        except OSError as e:
            raise UserError(f"--api_key_file {args.api_key_file}: cannot read it ({e.strerror})") from None
    elif given:
        key, source = args.api_key, "--api_key"
    elif API_KEY_ENV in os.environ:
        key, source = os.environ[API_KEY_ENV], API_KEY_ENV
    else:
        return None
    if not key:
        raise UserError(f"{source}: the API key is empty; give a key, or none of --api_key, --api_key_file and "
                        f"{API_KEY_ENV} to serve without one")
    return key


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_model(args: argparse.Namespace, runtime: Runtime) -> tuple[Transformer, Tokenizer, str]:
    dtype = DTYPES[args.dtype]
    if args.random_weights:
        tokenizer = Tokenizer(args.tokenizer_path)
        model_args = bench.random_model_args(args.random_weights, args.max_seq_len, args.max_batch_size or 8,
                                             args.dtype)
        if tokenizer.n_words != model_args.vocab_size:
            raise UserError(f"--tokenizer_path {args.tokenizer_path}: {tokenizer.n_words} tokens, but "
                            f"{args.random_weights} has a vocabulary of {model_args.vocab_size}")
        return bench.build_random_model(model_args, runtime, dtype), tokenizer, args.random_weights
    ckpt_dir = ensure_demo_checkpoint(runtime) if args.demo else args.converted_ckpt_dir
    model, tokenizer = load_converted(ckpt_dir, runtime, dtype, args.model_args, args.tokenizer_path,
                                      args.max_seq_len, args.max_batch_size)
    return model, tokenizer, "demo" if args.demo else Path(ckpt_dir).resolve().name


def bind(host: str, port: int, runtime: Runtime) -> socket.socket | None:
    """Rank 0 takes the listening socket before serving, so that a taken port is one clear
    error on every rank rather than a failure in the web server's thread."""
    sock, problem = None, None
    if runtime.is_main:
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            problem = f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another port or --port 0"
    shared = [problem]
    if runtime.world_size > 1:
        dist.broadcast_object_list(shared, src=0, device=runtime.device)
    if shared[0]:
        raise UserError(shared[0])
    return sock


def start_web_server(app: object, sock: socket.socket) -> "uvicorn.Server":
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.05)
    if not server.started:
        raise UserError("the web server did not start; see the messages above")
    server.thread = thread
    return server


def check_web_packages() -> None:
    """Before the model loads: the HTTP packages are imported only once it has."""
    missing = [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serve.py needs {', '.join(missing)}: pip install -r requirements.txt")


def main() -> None:
    args = parse_args()
    runtime = init_runtime(timeout_s=args.timeout)
    check_web_packages()
    model, tokenizer, default_name = load_model(args, runtime)
    chat_format = resolve_chat_format(tokenizer, args.chat_format)
    if args.compile:
        use_compiled_decode(model)
    config = engine_config(args, model)
    log(describe_pool(config, model))
    engine = Engine(model, config, tokenizer)
    seconds = warm_up(engine)
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(runtime.device) / 2**30:.2f} GiB (the longest "
            "prompt's last chunk included)" if runtime.device.type == "cuda" else "")
    log(f"warm-up{' (compiling the decode step)' if args.compile else ''}, the last chunk of a "
        f"{longest_prompt(engine)}-token prompt included: {seconds:.1f} s{peak}")
    sock = bind(args.host, args.port, runtime)
    scheduler = server = None
    if runtime.is_main:
        from llama.api import ServerConfig, create_app

        server_config = ServerConfig(args.model_name or default_name, tokenizer, chat_format, engine.max_seq_len,
                                     engine.capacity_tokens, args.api_key, args.max_body_bytes, is_loopback(args.host))
        if not args.api_key and not server_config.loopback_only:
            log(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use it; "
                f"set {API_KEY_ENV} or --api_key_file", file=sys.stderr)
        scheduler = Scheduler(engine.max_num_seqs, args.max_queue, Metrics())
        server = start_web_server(create_app(server_config, scheduler), sock)
        host, port = sock.getsockname()[:2]
        log(f"serving {server_config.model_name} at http://{host}:{port}/v1 (TP={runtime.world_size}, "
            f"max_batch_size {engine.max_num_seqs}, max_seq_len {model.args.max_seq_len}, {args.dtype} on "
            f"{runtime.device.type})")
    try:
        run_engine_loop(engine, runtime, scheduler)
    finally:
        if server is not None:
            server.should_exit = True
            server.thread.join(SERVER_THREAD_WAIT_S)
    log("server stopped")


if __name__ == "__main__":
    run_cli(main)
