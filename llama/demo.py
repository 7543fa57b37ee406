"""The built-in demo: a tiny Llama that has learned the Gettysburg Address.

Built once under the cache directory, on the CPU, in well under a minute: rank 0 trains a
sentencepiece tokenizer and a 4-layer model on the shipped text and saves them in Meta's
format; then all ranks convert that through the same code path as real weights.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.args import ModelArgs
from llama.checkpoint import MetaCheckpoint, convert
from llama.distributed import Runtime, log
from llama.meta_format import save_meta_checkpoint
from llama.model import Transformer
from llama.tokenizer import Tokenizer

TEXT_PATH = Path(__file__).parent / "data" / "gettysburg.txt"
DEMO_PROMPTS = ["Four score and seven years ago", "The world will little note,"]
DEMO_ARGS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512, max_batch_size=4)
# 256 byte pieces (sentencepiece's byte fallback, so any text can be spelled: JSON for
# structured outputs) + 256 for the text's own characters and merges.
VOCAB_SIZE = 512
# Written into the Meta checkpoint's folder; a cached demo with another (or no) version is rebuilt.
VERSION = "2: byte-fallback tokenizer"
VERSION_FILE = "demo_version"
TRAIN_STEPS = 300
TRAIN_BATCH = 8
TRAIN_WINDOW = 128


def cache_dir() -> Path:
    root = os.environ.get("TP_LLAMA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-llama"
    return Path(root) / "demo"


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE, byte_fallback: bool = True) -> bytes:
    """A BPE sentencepiece model of `text`; without byte fallback, characters it never saw
    become <unk> (the tests' small fixture tokenizer is trained that way)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=byte_fallback, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    return model.getvalue()


def train_model(tokens: list[int], args: ModelArgs, steps: int = TRAIN_STEPS) -> dict[str, torch.Tensor]:
    """Fit the model to the text until it can recite it from any starting phrase: each step
    sees a batch of random windows, each opened with BOS as a prompt would be.
    Returns Meta-named weights."""
    torch.manual_seed(0)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.02)
    text = torch.tensor(tokens[1:])
    bos = torch.full((TRAIN_BATCH, 1), tokens[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        # Every other step starts at the beginning, so the opening is learned with its true context.
        starts = torch.randint(0, len(text) - TRAIN_WINDOW, (TRAIN_BATCH,)) * (step % 2)
        windows = torch.cat([bos, torch.stack([text[s:s + TRAIN_WINDOW] for s in starts])], dim=1)
        logits = model(windows[:, :-1], all_logits=True)  # no KV cache: nothing chains the steps
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    log(f"demo model trained: final loss {loss.item():.3f}")
    return {k: v.detach() for k, v in model.state_dict().items()}


def build_meta_checkpoint(meta_dir: Path) -> None:
    """Train tokenizer and model, then write them in Meta's layout, atomically."""
    staging = meta_dir.with_name(meta_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "tokenizer.model").write_bytes(train_tokenizer(TEXT_PATH.read_text()))
    tokenizer = Tokenizer(staging / "tokenizer.model")
    args = ModelArgs(**DEMO_ARGS, vocab_size=tokenizer.n_words)
    tokens = tokenizer.encode(TEXT_PATH.read_text(), bos=True, eos=True)
    save_meta_checkpoint(train_model(tokens, args), args, staging)
    (staging / VERSION_FILE).write_text(VERSION)
    staging.rename(meta_dir)


def is_current(meta_dir: Path) -> bool:
    """The demo's Meta checkpoint is there, built by this version of the code."""
    marker = meta_dir / VERSION_FILE
    return marker.is_file() and marker.read_text() == VERSION


def ensure_demo_checkpoint(runtime: Runtime) -> Path:
    """Return the demo's converted checkpoint, building it first if the cache lacks it."""
    root = cache_dir()
    meta_dir, dcp_dir = root / "meta", root / "dcp"
    # Each rank decides for itself. Rank 0 deletes a stale demo's conversion before rebuilding, so
    # no rank can find one and skip the collective conversion that the others wait in.
    if not (is_current(meta_dir) and (dcp_dir / ".metadata").is_file()):
        if runtime.is_main and not is_current(meta_dir):
            log(f"building the demo model in {root} (once; about a minute on a laptop CPU)")
            shutil.rmtree(dcp_dir, ignore_errors=True)
            shutil.rmtree(meta_dir, ignore_errors=True)
            build_meta_checkpoint(meta_dir)
        dist.barrier()
        ckpt = MetaCheckpoint(meta_dir, max_seq_len=DEMO_ARGS["max_seq_len"], max_batch_size=DEMO_ARGS["max_batch_size"])
        convert(ckpt, dcp_dir, runtime, "float32", overwrite=True)
    return dcp_dir
