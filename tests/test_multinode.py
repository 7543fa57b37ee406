"""Two torchrun launchers on this machine as two nodes of one TP=2 job, and jobs that lose a
rank or a launcher: real processes, real gloo, real SIGKILLs. A lost rank must end every other
rank with a non-zero status within LOST_RANK_BOUND_S, one line naming it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch import distributed as dist

from helpers import LLAMA3_TINY, Launchers, alive, children, make_meta_checkpoint, run_script
from llama.distributed import JobWatch

LOST_RANK_BOUND_S = 60
# Every job here must end long before this, or the test fails.
JOB_TIMEOUT_S = 180


def run_two_nodes(script: str, *args: object) -> list[subprocess.CompletedProcess]:
    with Launchers(script, *args, nodes=2, nproc=1) as job:
        codes = [job.wait(node, JOB_TIMEOUT_S) for node in (0, 1)]
        return [subprocess.CompletedProcess(p.args, code, out.decode(), err.decode())
                for p, code, out, err in zip(job.procs, codes, job.out, job.err)]


def assert_succeeded(results: list[subprocess.CompletedProcess]) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def two_node_ckpt(tmp_path_factory, small_sp_tokenizer) -> Path:
    """A 2-shard Meta checkpoint converted by two launchers of one rank each."""
    meta = tmp_path_factory.mktemp("multinode") / "meta"
    make_meta_checkpoint(meta, small_sp_tokenizer, n_shards=2, llama2_layout=False, **LLAMA3_TINY)
    out = meta.parent / "dcp"
    assert_succeeded(run_two_nodes("convert_checkpoints.py", "--original_ckpt_dir", meta, "--save_checkpoint_dir",
                                   out, "--dtype", "float32"))
    return out


def generate_args(ckpt: Path, *extra: object) -> tuple[object, ...]:
    return ("--converted_ckpt_dir", ckpt, "--dtype", "float32", "--temperature", "0", *extra)


def test_two_launchers_generate_and_benchmark_like_one(two_node_ckpt, tmp_path):
    prompts = ("--prompt", "Four score", "--prompt", "We are met on a great")
    two = run_two_nodes("generate.py", *generate_args(two_node_ckpt, *prompts, "--max_gen_len", "8",
                                                      "--output_json", tmp_path / "two.json"))
    assert_succeeded(two)
    one = run_script("generate.py", *generate_args(two_node_ckpt, *prompts, "--max_gen_len", "8",
                                                   "--output_json", tmp_path / "one.json"), nproc=2)
    assert one.returncode == 0, one.stderr
    results = [json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("one", "two")]
    assert [len(r["tokens"]) for r in results[0]] == [8, 8]
    assert [r["tokens"] for r in results[1]] == [r["tokens"] for r in results[0]]
    assert "".join(r.stdout for r in two) == one.stdout  # rank 0 prints, on whichever node it is

    bench = run_two_nodes("benchmark.py", "--converted_ckpt_dir", two_node_ckpt, "--dtype", "float32",
                          "--batch_size", "1", "--prompt_len", "4", "--gen_len", "4", "--trials", "1", "--warmup",
                          "0", "--output_json", tmp_path / "bench.json")
    assert_succeeded(bench)
    # Ranks under two launchers count as two machines: torch.distributed, never shared memory.
    assert "collectives: torch.distributed (gloo)" in "".join(r.stdout for r in bench)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["world_size"] == 2 and len(report["results"]) == 1
    assert report["results"][0]["decode_tokens_per_s_batch"]["median"] > 0


# --- faults ------------------------------------------------------------------------------


def assert_lost(job: Launchers, lost_rank: int, killed_at: float, survivors: list[int]) -> None:
    """The survivors' launchers end non-zero within the bound; one line names the lost rank."""
    for node in survivors:
        code = job.wait(node, timeout=LOST_RANK_BOUND_S + killed_at - time.monotonic())
        assert code != 0
    assert time.monotonic() - killed_at < LOST_RANK_BOUND_S
    for node in set(range(len(job.procs))) - set(survivors):  # the lost rank's launcher: its output too
        job.wait(node, timeout=JOB_TIMEOUT_S)
    lines = [line for line in job.error_lines() if line.startswith("error: lost rank")]
    assert lines == [line for line in job.error_lines() if line.startswith("error:")], job.error_lines()
    assert len(lines) == 1 and lines[0].startswith(f"error: lost rank {lost_rank} ("), job.error_lines()
    assert all(not alive(pid) for pid in job.started_workers)


def test_rank_killed_while_loading(two_node_ckpt, tmp_path):
    """The weights are FIFOs nobody writes to, so every rank is stuck reading them (its main
    thread blocked in open(), as in a wait that never returns to Python) when one is killed."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_node_ckpt, ckpt)
    for data in ckpt.glob("*.distcp"):
        data.unlink()
        os.mkfifo(data)
    with Launchers("generate.py", *generate_args(ckpt, "--prompt", "Four score")) as job:
        ranks = job.workers(2)
        deadline = time.monotonic() + 90
        while not all(_blocked_opening_fifo(pid) for pid in ranks.values()):
            assert time.monotonic() < deadline, "the ranks never reached the weights"
            time.sleep(0.1)
        os.kill(ranks[1], signal.SIGKILL)
        assert_lost(job, 1, time.monotonic(), survivors=[0])


def _blocked_opening_fifo(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except OSError:
        return False


def test_rank_killed_while_generating(two_node_ckpt):
    long_run = ("--prompt", "Four score", "--max_gen_len", "4000", "--max_seq_len", "4096", "--stream")
    with Launchers("generate.py", *generate_args(two_node_ckpt, *long_run)) as job:
        ranks = job.workers(2)
        job.read_until(0, lambda out: len(out.partition(b"\n")[2]) > 10)  # tokens are streaming
        os.kill(ranks[1], signal.SIGKILL)
        assert_lost(job, 1, time.monotonic(), survivors=[0])


def test_rank_killed_in_interactive_chat_across_launchers(two_node_ckpt):
    """Rank 0 (reading the terminal) dies; rank 1, on the other launcher, waits for its line."""
    with Launchers("generate.py", *generate_args(two_node_ckpt, "--interactive"), nodes=2, nproc=1) as job:
        ranks = job.workers(2)
        first = next(node for node, proc in enumerate(job.procs) if ranks[0] in children(proc.pid))
        job.read_until(first, lambda out: out.endswith(b"> "))
        os.kill(ranks[0], signal.SIGKILL)
        assert_lost(job, 0, time.monotonic(), survivors=[1 - first])


def test_killed_launcher_ends_the_other_node(two_node_ckpt):
    """The launcher of rank 1's node dies: its worker notices and stops, rank 0 reports it lost."""
    with Launchers("generate.py", *generate_args(two_node_ckpt, "--interactive"), nodes=2, nproc=1) as job:
        ranks = job.workers(2)
        second = next(node for node, proc in enumerate(job.procs) if ranks[1] in children(proc.pid))
        job.read_until(1 - second, lambda out: out.endswith(b"> "))
        job.procs[second].kill()
        killed_at = time.monotonic()
        assert job.wait(1 - second, timeout=LOST_RANK_BOUND_S) != 0
        while alive(ranks[1]):
            assert time.monotonic() - killed_at < LOST_RANK_BOUND_S, "the orphaned rank 1 kept running"
            time.sleep(0.1)
        job.wait(second, timeout=10)  # its stderr: the orphan's own line
        assert time.monotonic() - killed_at < LOST_RANK_BOUND_S
        # The killed launcher may have held the job's store (the first to bind the rendezvous
        # port does); rank 0 then reports that, as its own launcher stops it.
        lines = job.error_lines(1 - second)
        assert len(lines) == 1, lines
        assert lines[0] == f"error: lost rank 1 (its launcher on {socket.gethostname()} ended); stopping the job" or \
            re.fullmatch(r"error: lost the job's store at \S+ \(the launcher or machine that held it ended\); "
                         r"stopping the job", lines[0]), lines
        assert job.error_lines(second) == [
            f"error (rank 1): its launcher (pid {job.procs[second].pid}) ended; this rank stops too"]


WATCHED_RANK = """
import sys
from llama.distributed import DONE, JobWatch
watch = JobWatch(1, 2, "127.0.0.1", int(sys.argv[1]))
if sys.stdin.read() == "done":
    watch.leave(DONE)
"""


@pytest.mark.parametrize("ends", ["done", "without a word"])
def test_a_rank_ending_after_the_watch_last_looked(ends):
    """The watch reads the ranks' states, then looks whether their processes live: a rank that
    finished in between (its final state stored, then its process gone) is not lost; one that
    ended without a final state is."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rank1 = subprocess.Popen([sys.executable, "-c", WATCHED_RANK, str(store.port)], stdin=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parent.parent)
    watch = JobWatch(0, 2, "127.0.0.1", store.port)  # waits for rank 1 to register
    watch._read_peers(time.monotonic())  # the last look: rank 1 is running
    rank1.communicate(ends.encode(), timeout=60)
    lost = watch._lost(watch._members[1], time.monotonic(), 1.0, store_ok=True)
    if ends == "done":
        assert lost is None
    else:
        assert lost == f"process {rank1.pid} on {socket.gethostname()} ended"
