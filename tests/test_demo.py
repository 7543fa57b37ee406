"""The README's demo command, as a newcomer runs it: TP=2 on the CPU, nothing downloaded."""

import shutil

from helpers import run_script
from llama.demo import VERSION_FILE, is_current


def test_demo_recites_the_text_at_tp2(demo_build):
    cache, first = demo_build  # the first run, into an empty cache
    assert "building the demo model" in first.stdout
    assert "our fathers brought forth on this continent, a new nation" in first.stdout
    assert "nor long remember what we say here" in first.stdout
    assert not list(cache.rglob("*.partial"))

    again = run_script("generate.py", "--demo", "--prompt", "It is for us the living,", "--max_gen_len", "12",
                       nproc=2, env={"TP_LLAMA_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    assert "building" not in again.stdout
    assert "rather, to be dedicated here" in again.stdout


def test_a_demo_cached_by_an_older_version_is_rebuilt(demo_build, tmp_path):
    """A cache from before the version marker (the tokenizer without byte pieces) is not reused."""
    shutil.copytree(demo_build[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "demo" / "meta" / VERSION_FILE).unlink()
    result = run_script("generate.py", "--demo", "--prompt", "It is for us the living,", "--max_gen_len", "12",
                        nproc=2, env={"TP_LLAMA_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "building the demo model" in result.stdout and "rather, to be dedicated here" in result.stdout
    assert is_current(tmp_path / "demo" / "meta")
