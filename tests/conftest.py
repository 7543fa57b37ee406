import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def small_sp_tokenizer(tmp_path_factory) -> Path:
    """A 256-token sentencepiece model trained on the demo text: small embeddings, fast tests."""
    from llama.demo import TEXT_PATH, train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train_tokenizer(TEXT_PATH.read_text()))
    return path
