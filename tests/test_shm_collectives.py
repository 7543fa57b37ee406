"""The shared-memory collectives (llama/shm_collectives.py) on real processes: equal to gloo's
bit for bit, and a killed peer ends the rank waiting for it."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, run_script


@pytest.mark.parametrize("nproc", [2, 4])
def test_equal_to_gloo_bit_for_bit(nproc):
    result = run_script("tests/shm_check.py", nproc=nproc)
    assert result.returncode == 0, result.stderr
    assert "path: shared memory" in result.stdout  # not a fallback compared with itself


def test_turned_off_uses_gloo():
    result = run_script("tests/shm_check.py", nproc=2, env={"TP_LLAMA_SHM": "0"})
    assert result.returncode == 0, result.stderr
    assert "path: torch.distributed (gloo): turned off by TP_LLAMA_SHM=0" in result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_peer_ends_the_waiting_rank():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, str(REPO / "tests/shm_wait.py")], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for p in ranks:
            assert p.stdout.readline().strip() == "ready: shared memory"
        time.sleep(0.5)  # rank 0 is now waiting in the all-reduce
        ranks[1].send_signal(signal.SIGKILL)  # and left unreaped: a zombie, as under a busy launcher
        killed = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == 1
    assert stderr.strip().splitlines() == ["error: rank 1 exited during a shared-memory all-reduce"]
    assert elapsed < 5


def test_ranks_that_disagree_fail_in_one_line():
    """Each rank publishes its call's operation, size and dtype with the round: a peer whose
    call differs is an error on every rank, not a silent mix of each other's data."""
    result = run_script("tests/shm_misuse.py", "mismatch", nproc=2)
    assert result.returncode == 0, result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert lines == sorted([
        "rank 0: shared-memory collectives out of step: rank 0 called an all-reduce of 16 bytes of float32 "
        "while rank 1 called an all-reduce of 4000 bytes of float32",
        "rank 0: shared-memory collectives out of step: rank 0 called an all-gather of 24 bytes in rows of 12 "
        "while rank 1 called an all-gather of 48 bytes in rows of 24",
        "rank 1: shared-memory collectives out of step: rank 1 called an all-reduce of 4000 bytes of float32 "
        "while rank 0 called an all-reduce of 16 bytes of float32",
        "rank 1: shared-memory collectives out of step: rank 1 called an all-gather of 48 bytes in rows of 24 "
        "while rank 0 called an all-gather of 24 bytes in rows of 12"]), result.stdout


def test_no_room_for_the_segment_falls_back_to_gloo():
    """The segment's pages are reserved when it is made (posix_fallocate): a /dev/shm without
    room for it means gloo, not a SIGBUS at the first write; and no segment is left behind."""
    result = run_script("tests/shm_misuse.py", "no_room", nproc=2)
    assert result.returncode == 0, result.stderr
    assert "path: torch.distributed (gloo): /dev/shm has no room for" in result.stdout
    assert "segments left: []" in result.stdout
