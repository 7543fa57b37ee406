import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def small_sp_tokenizer(tmp_path_factory) -> Path:
    """A 256-token sentencepiece model trained on the demo text: small embeddings, fast tests.
    Without byte fallback (unlike the demo's), so characters the text lacks are <unk>."""
    from llama.demo import TEXT_PATH, train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train_tokenizer(TEXT_PATH.read_text(), vocab_size=256, byte_fallback=False))
    return path


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo, built once for every test that needs it, as a newcomer first runs it
    (generate.py --demo at TP=2 into an empty cache): the cache folder (TP_LLAMA_CACHE) and
    that first run's output."""
    from helpers import run_script

    cache = tmp_path_factory.mktemp("demo_cache")
    first = run_script("generate.py", "--demo", nproc=2, env={"TP_LLAMA_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    return cache, first
