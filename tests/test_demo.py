"""The README's demo command, as a newcomer runs it: TP=2 on the CPU, nothing downloaded."""

from helpers import run_script


def test_demo_recites_the_text_at_tp2(tmp_path):
    env = {"TP_LLAMA_CACHE": str(tmp_path)}
    first = run_script("generate.py", "--demo", nproc=2, env=env)
    assert first.returncode == 0, first.stderr
    assert "building the demo model" in first.stdout
    assert "our fathers brought forth on this continent, a new nation" in first.stdout
    assert "nor long remember what we say here" in first.stdout
    assert not list(tmp_path.rglob("*.partial"))

    again = run_script("generate.py", "--demo", "--prompt", "It is for us the living,", "--max_gen_len", "12",
                       nproc=2, env=env)
    assert again.returncode == 0, again.stderr
    assert "building" not in again.stdout
    assert "rather, to be dedicated here" in again.stdout
