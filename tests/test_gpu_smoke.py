"""The whole pipeline on the GPUs present: conversion (CPU by design), then generation with NCCL
in bfloat16 at TP=1 and TP=2, and the demo; skipped without GPUs."""

import json

import pytest
import torch

from helpers import LLAMA3_TINY, make_meta_checkpoint, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_convert_and_generate_on_gpus(tmp_path, small_sp_tokenizer):
    n_gpus = min(2, torch.cuda.device_count())
    make_meta_checkpoint(tmp_path / "meta", small_sp_tokenizer, n_shards=2, llama2_layout=False, **LLAMA3_TINY)
    converted = run_script("convert_checkpoints.py", "--original_ckpt_dir", tmp_path / "meta",
                           "--save_checkpoint_dir", tmp_path / "dcp", nproc=n_gpus, gpu=True)
    assert converted.returncode == 0, converted.stderr

    tokens = {}
    for k in sorted({1, n_gpus}):
        out = tmp_path / f"out{k}.json"
        result = run_script("generate.py", "--converted_ckpt_dir", tmp_path / "dcp", "--prompt", "Four score",
                            "--prompt", "We are met", "--temperature", "0", "--max_gen_len", "8",
                            "--output_json", out, nproc=k, gpu=True)
        assert result.returncode == 0, result.stderr
        tokens[k] = [r["tokens"] for r in json.loads(out.read_text())["results"]]
    assert all(len(t) == 8 for t in tokens[1])
    assert tokens[n_gpus] == tokens[1]


def test_more_ranks_than_gpus(tmp_path):
    result = run_script("generate.py", "--demo", nproc=torch.cuda.device_count() + 1, gpu=True,
                        env={"TP_LLAMA_CACHE": str(tmp_path)})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "visible GPU" in errors[0], result.stderr


def test_demo_on_gpus(tmp_path):
    result = run_script("generate.py", "--demo", nproc=min(2, torch.cuda.device_count()), gpu=True,
                        env={"TP_LLAMA_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "our fathers brought forth" in result.stdout
