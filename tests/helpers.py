"""Shared test tools: tiny Meta-format checkpoints, real tokenizer files, torchrun launches."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.meta_format import save_meta_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Tiny shapes in the two families' styles: Llama 2 (MHA, theta 1e4) and Llama 3.1 (GQA,
# theta 5e5, scaled rope, ffn_dim_multiplier).
LLAMA2_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, norm_eps=1e-5,
                   rope_theta=10000.0, max_seq_len=128, max_batch_size=4)
LLAMA3_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
                   norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=128, max_batch_size=4)


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package (see requirements-fixtures.txt)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is not installed: pip install --no-deps -r requirements-fixtures.txt"
    return Path(spec.origin).parent / relative


def llama3_tokenizer_path() -> Path:
    return package_file("llama_models", "llama3/tokenizer.model")


def sentencepiece_32k_path() -> Path:
    return package_file("mistral_common", "data/tokenizer.model.v1")


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full float32 weights with Meta names, scaled so logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in args.weight_shapes().items():
        if len(shape) == 1:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            std = {"tok_embeddings.weight": 1.0, "output.weight": 4.0 / shape[-1] ** 0.5}.get(name, 0.5 / shape[-1] ** 0.5)
            state[name] = torch.randn(shape, generator=g) * std
    return state


def make_meta_checkpoint(out_dir: Path, tokenizer_path: Path, n_shards: int = 1, llama2_layout: bool = True,
                         tied_output: bool = False, seed: int = 0, **arch: object) -> ModelArgs:
    """A random tiny model written in Meta's format, with its tokenizer.model beside it."""
    from llama.tokenizer import Tokenizer

    args = ModelArgs(**(arch or LLAMA2_TINY), vocab_size=Tokenizer(tokenizer_path).n_words)
    state = random_weights(args, seed)
    if tied_output:
        state["output.weight"] = state["tok_embeddings.weight"]
    save_meta_checkpoint(state, args, out_dir, n_shards=n_shards, llama2_layout=llama2_layout,
                         tied_output=tied_output)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    return args


def torchrun_command(script: str, *args: object, nproc: int = 1, rdzv_port: int | None = None) -> list[str]:
    """torchrun running one of the project's scripts with `nproc` ranks: a job of its own, or
    with `rdzv_port` one of two launchers ("nodes") that meet at 127.0.0.1:rdzv_port."""
    launch = (["--standalone"] if rdzv_port is None else
              ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}"])
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(nproc),
            str(REPO / script), *map(str, args)]


def script_env(gpu: bool = False, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched script: CPU and gloo unless `gpu`, which leaves the GPUs
    visible (NCCL)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}), **(env or {})}


def run_script(script: str, *args: object, nproc: int = 1, timeout: float = 300, gpu: bool = False,
               env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts under torchrun with `nproc` ranks (see script_env)."""
    return subprocess.run(torchrun_command(script, *args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=script_env(gpu, env), cwd=REPO, input=input)


def convert(src: Path, out: Path, nproc: int = 1, *extra: object) -> subprocess.CompletedProcess:
    result = run_script("convert_checkpoints.py", "--original_ckpt_dir", src, "--save_checkpoint_dir", out,
                        "--dtype", "float32", *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return result


def generate_json(ckpt: Path, out_json: Path, *prompts: str, nproc: int = 1, extra: tuple = ()) -> dict:
    args = [a for p in prompts for a in ("--prompt", p)]
    result = run_script("generate.py", "--converted_ckpt_dir", ckpt, "--output_json", out_json, "--dtype", "float32",
                        "--temperature", "0", *args, *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return json.loads(out_json.read_text())
