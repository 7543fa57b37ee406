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
