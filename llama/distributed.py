"""Process-group setup, rank-0 logging, the error handling shared by the scripts, and the watch
that ends a job within seconds when one of its ranks is lost.

One code path for every target: CUDA + NCCL when GPUs are visible (one per local rank),
otherwise CPU + gloo. Scripts run under torchrun or as a plain single process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llama.errors import UserError

# How long a rank other than 0 waits, after failing, for rank 0 to report the same error.
OTHER_RANKS_ERROR_GRACE_S = 10.0
# Collective timeout unless --timeout says otherwise: NCCL's own default, long enough for the
# slowest rank to read its part of a 70B checkpoint while the others wait in DCP's collective.
# A lost rank does not wait for it: the watch below ends the job within seconds.
DEFAULT_TIMEOUT_S = 600.0
# The watch's period: heartbeat, launcher, peer processes, SIGTERM.
WATCH_INTERVAL_S = 0.5
# A rank on another machine whose heartbeat stood still this long is lost (machine, network or
# process gone). Long enough for a rank whose main thread holds the GIL in a long C call.
REMOTE_SILENCE_S = 30.0
# After a collective failed, the heartbeat of a live remote rank must move within this.
SUSPECT_SILENCE_S = 3.0
# The store the watch talks through answered no request for this long: it is gone. Once its
# server has closed the connection, the watch still waits a moment for what caused that (the
# processes of that launcher ending) to show.
STORE_SILENCE_S = 15.0
STORE_GONE_GRACE_S = 2.0
# After a SIGTERM, how long a rank still looks for a lost rank or store to report before it
# ends quietly: a lost rank's report takes up to two watch intervals (its own, then this one's),
# a lost store's STORE_GONE_GRACE_S and one.
SIGTERM_GRACE_S = STORE_GONE_GRACE_S + 2 * WATCH_INTERVAL_S
STORE_REQUEST_TIMEOUT_S = 5.0
# How long a failing rank waits for the others to see that it reported its failure.
LEAVE_ACKNOWLEDGE_S = 3.0


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def log(*parts: object, **print_kwargs: object) -> None:
    """Print on rank 0 only; every rank calls it so nothing is said twice."""
    if _rank() == 0:
        print(*parts, **print_kwargs, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element by element, the largest of every rank's `values`, in one collective that
    every rank must join (`device` must suit the backend: a GPU for NCCL)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"collective timeout: how long a rank waits for the others in one collective "
                             f"(default {DEFAULT_TIMEOUT_S:.0f}; a lost rank ends the job within seconds anyway)")


def init_runtime(use_gpus: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> Runtime:
    """Join (or form, when run without torchrun) the process group and build a 1-D mesh.

    use_gpus=False keeps a job on the CPU with gloo even where GPUs are visible (checkpoint
    conversion only moves bytes from disk to disk). timeout_s bounds every collective."""
    if timeout_s <= 0:
        raise UserError(f"--timeout {timeout_s:g}: use a positive number of seconds")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpus and torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            raise UserError(
                f"--nproc_per_node {local_world} exceeds the {torch.cuda.device_count()} visible GPU(s); "
                f"use at most {torch.cuda.device_count()} processes per node"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
        # A collective that fails or times out ends the process from NCCL's watchdog, without
        # first aborting the communicator (which can itself hang on a dead peer). This is torch's
        # default, stated because the watch and the timeout above rely on it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("tp",))
    if world_size > 1 and _WATCH is None and "MASTER_ADDR" in os.environ:
        _start_watch(JobWatch(dist.get_rank(), world_size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
    return Runtime(rank=dist.get_rank(), world_size=world_size, device=device, mesh=mesh, timeout_s=timeout_s)


# ---------------------------------------------------------------------------------------
# The watch: a lost rank ends the job


@dataclass(frozen=True)
class _Member:
    rank: int
    host: str
    machine: str  # processes of one machine and pid namespace: their pids can be checked directly
    pid: int


def _machine_id() -> str:
    """The boot and pid namespace this process lives in (Linux): equal for two processes exactly
    when one can look the other's pid up in /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc: every other rank counts as remote
        return f"{socket.gethostname()}/{os.getpid()}"


def _process_alive(pid: int) -> bool:
    """Whether a process of this machine is still running (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# What a rank publishes on its way out; while it runs, its heartbeat count.
DONE = "done"  # finished: nothing for the others to do about it
FAILED = "failed"  # said what went wrong itself (a line or a traceback): the others stop quietly
STOPPED = "stopped"  # ended because of another rank's fault, which one survivor reports
LAUNCHER_LOST = "launcher lost"  # its launcher died: the others report the rank lost
_ENDED = (DONE, FAILED, STOPPED)


class JobWatch:
    """Ends this rank within seconds when the job cannot go on, instead of a collective timeout.

    A daemon thread with a store connection of its own (a main thread blocked in the process
    group's store never delays it) publishes a heartbeat and looks at the other ranks every
    WATCH_INTERVAL_S. A rank is lost when it ended without publishing a final state: on this
    machine its pid is gone (known at once), elsewhere its heartbeat stood still for
    REMOTE_SILENCE_S (SUSPECT_SILENCE_S once a collective has failed). Then the lowest surviving
    rank prints one line naming the lost ranks, and every survivor exits with status 1. It also
    ends this rank, quietly, when another one failed and said so itself; when this rank's
    launcher died (torchrun's workers outlive it); and when the job's store is gone.

    SIGTERM, with which torchrun stops the other workers once one has died, is handled here too:
    the main thread may be blocked in a C call (an NCCL wait on a dead peer) and never run a
    Python signal handler, but the signal's wakeup byte reaches this thread."""

    def __init__(self, rank: int, world_size: int, store_host: str, store_port: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.store_address = f"{store_host}:{store_port}"
        self._store = dist.TCPStore(store_host, store_port, is_master=False, wait_for_workers=False,
                                    timeout=timedelta(seconds=STORE_REQUEST_TIMEOUT_S))
        # A connection to the store's server that never sends: it turns readable (end of file)
        # when the server is gone, so the watch stops using the store client, which would log
        # each failed request with a C++ stack trace.
        self._store_probe = socket.create_connection((store_host, store_port), timeout=STORE_REQUEST_TIMEOUT_S)
        self._store_gone_at: float | None = None
        self._store_answered = time.monotonic()
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
        self._prefix = f"tp_llama/watch/{run}/"
        # torchrun's workers outlive a killed launcher; a job started some other way may well
        # outlive the shell that started it, on purpose.
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._me = _Member(rank, socket.gethostname(), _machine_id(), os.getpid())
        self._members: dict[int, _Member] = {}
        self._states: dict[int, str] = {}
        self._heartbeats: dict[int, tuple[str, float]] = {}  # rank -> (last value, when it last changed)
        self._beat = 0
        self._suspect = threading.Event()
        self.sigterm_grace_s: float | None = None  # see stop_cleanly_on_sigterm
        self._sigterm_deadline: float | None = None
        self._ending = threading.Lock()  # held by whoever ends the process
        self._publishing = threading.Lock()
        self._final = False
        self._store.set(self._key("member", rank), json.dumps(self._me.__dict__))
        self._publish(str(self._beat))
        # Know every rank before the first collective: a rank lost right after starting must be
        # named too (the others registered at about the same time, after the process group).
        try:
            self._store.wait([self._key("member", r) for r in range(world_size) if r != rank],
                             timedelta(seconds=STORE_REQUEST_TIMEOUT_S))
            self._read_peers(time.monotonic())
        except dist.DistError:  # a rank that never registered: the watch keeps looking
            pass

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}{kind}/{rank}"

    def _publish(self, state: str, final: bool = False) -> None:
        """Store this rank's state, with a round trip so it is stored before the process can end.
        Once a final state is out, no heartbeat may overwrite it."""
        with self._publishing:
            if self._final:
                return
            self._final = final
            self._store.set(self._key("state", self.rank), state)
            self._store.check([self._key("state", self.rank)])

    def _store_usable(self, now: float) -> bool:
        if self._store_gone_at is None and select.select([self._store_probe], [], [], 0)[0]:
            self._store_gone_at = now
        return self._store_gone_at is None

    def _fetch_states(self, ranks: list[int]) -> dict[int, str]:
        return {r: raw.decode() for r, raw in zip(ranks, self._store.multi_get([self._key("state", r) for r in ranks]))}

    # -- called from the main thread

    def start(self, wakeup_fd: int) -> None:
        threading.Thread(target=self._run, args=(wakeup_fd,), name="tp-llama-watch", daemon=True).start()

    def explain_failure(self) -> None:
        """The main thread failed (a collective raised, say): give the watch the time to find a
        lost rank behind it, in which case the watch ends the process and this never returns."""
        self._suspect.set()
        remote = any(m.machine != self._me.machine for m in dict(self._members).values())
        deadline = time.monotonic() + (SUSPECT_SILENCE_S + 2 * WATCH_INTERVAL_S if remote else 3 * WATCH_INTERVAL_S)
        while time.monotonic() < deadline:
            # A dead rank of this machine is found here too: the watch thread may be waiting
            # on a store whose host is going down (a launcher ending with its killed rank).
            local = {r: m for r, m in dict(self._members).items() if m.machine == self._me.machine}
            self._end_if_lost(local, time.monotonic(), SUSPECT_SILENCE_S, store_ok=False)
            time.sleep(WATCH_INTERVAL_S / 5)

    def leave(self, state: str) -> None:
        """Publish this rank's final state and keep the watch from ending the process meanwhile.
        After a failure, wait (briefly) until the other ranks have seen it: the store may end
        with this process's launcher, and they must know the failure was reported."""
        self._ending.acquire()
        if not self._store_usable(time.monotonic()):
            return
        try:
            self._publish(state, final=True)
            deadline = time.monotonic() + LEAVE_ACKNOWLEDGE_S
            while state == FAILED and time.monotonic() < deadline and not self._all_others_ended():
                time.sleep(WATCH_INTERVAL_S / 5)
        except dist.DistError:  # the store is gone: nobody is left to read it
            pass

    def _all_others_ended(self) -> bool:
        members = dict(self._members)
        states = self._fetch_states(list(members))
        return len(members) == self.world_size - 1 and all(
            states[r] in (*_ENDED, LAUNCHER_LOST) or (m.machine == self._me.machine and not _process_alive(m.pid))
            for r, m in members.items())

    # -- the watch thread

    def _run(self, wakeup_fd: int) -> None:
        while True:
            ready, _, _ = select.select([wakeup_fd], [], [], WATCH_INTERVAL_S)
            terminated = False
            if ready:
                try:
                    terminated = signal.SIGTERM in os.read(wakeup_fd, 512)
                except BlockingIOError:
                    pass
            self._check(terminated)

    def _check(self, terminated: bool) -> None:
        now = time.monotonic()
        if self._launcher is not None and os.getppid() != self._launcher:
            self._end(f"error (rank {self.rank}): its launcher (pid {self._launcher}) ended; this rank stops too",
                      state=LAUNCHER_LOST)
        if self._store_usable(now):
            try:
                self._beat += 1
                self._publish(str(self._beat))
                self._read_peers(now)
                self._store_answered = now
            except dist.DistNetworkError:
                self._store_gone_at = now
            except dist.DistError:  # a request timed out: the store may only be slow
                pass
        if FAILED in self._states.values():
            self._end(None)  # that rank has said what went wrong
        stopping = terminated or self._sigterm_deadline is not None
        silence = SUSPECT_SILENCE_S if self._suspect.is_set() or stopping else REMOTE_SILENCE_S
        self._end_if_lost(dict(self._members), now, silence, store_ok=self._store_answered == now)
        gone = self._store_gone_at is not None and now - self._store_gone_at > STORE_GONE_GRACE_S
        if gone or now - self._store_answered > STORE_SILENCE_S:
            self._end(f"error: lost the job's store at {self.store_address} (the launcher or machine that held it "
                      "ended); stopping the job", survivors_exclude=set(), same_machine_only=True)
        if terminated and self._sigterm_deadline is None:
            # A launcher stops its workers when a rank of another launcher was lost, often before
            # this watch has seen it: a moment to say which (a server's main thread meanwhile
            # stops the job cleanly, see stop_cleanly_on_sigterm).
            grace = SIGTERM_GRACE_S if self.sigterm_grace_s is None else self.sigterm_grace_s
            self._sigterm_deadline = now + grace
        elif terminated or (self._sigterm_deadline is not None and now > self._sigterm_deadline):
            # torchrun or the user stops this worker, and no other rank is to blame
            self._end(None, code=128 + signal.SIGTERM)

    def _read_peers(self, now: float) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        unknown = [r for r in others if r not in self._members]
        if unknown and self._store.check([self._key("member", r) for r in unknown]):
            for r, raw in zip(unknown, self._store.multi_get([self._key("member", r) for r in unknown])):
                self._members[r] = _Member(**json.loads(raw))
        for r, state in self._fetch_states([r for r in others if r in self._members]).items():
            self._states[r] = state
            if self._heartbeats.get(r, ("", 0.0))[0] != state:
                self._heartbeats[r] = (state, now)

    def _end_if_lost(self, members: dict[int, _Member], now: float, silence: float, store_ok: bool) -> None:
        lost = {r: why for r, m in members.items() if (why := self._lost(m, now, silence, store_ok))}
        if lost:
            self._end(f"error: lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, sorted(lost)))} "
                      f"({'; '.join(lost[r] for r in sorted(lost))}); stopping the job", survivors_exclude=set(lost))

    def _lost(self, member: _Member, now: float, silence: float, store_ok: bool) -> str | None:
        """Why `member` counts as lost, or None while it may be alive or has ended properly."""
        state = self._states.get(member.rank)
        local = member.machine == self._me.machine
        gone = local and state not in (*_ENDED, LAUNCHER_LOST) and not _process_alive(member.pid)
        if gone and store_ok:
            # A rank stores its final state before it ends, but the states read above may be
            # older than that: a rank that finished (or saw its launcher end) since is not lost.
            state = self._refetch_state(member.rank)
        if state == LAUNCHER_LOST:
            return f"its launcher on {member.host} ended"
        if state in _ENDED:
            return None
        if local:
            return f"process {member.pid} on {member.host} ended" if gone else None
        quiet = now - self._heartbeats.get(member.rank, ("", now))[1]
        if quiet < silence or not store_ok:  # without the store no heartbeat is seen: that is reported instead
            return None
        return f"no sign of life from {member.host} for {quiet:.0f} s"

    def _refetch_state(self, rank: int) -> str | None:
        try:
            self._states[rank] = self._fetch_states([rank])[rank]
        except dist.DistError:
            return None
        return self._states[rank]

    def _end(self, line: str | None, code: int = 1, state: str = STOPPED, survivors_exclude: set[int] | None = None,
             same_machine_only: bool = False) -> NoReturn:
        """End the process, once, whoever comes first. Every survivor of a fault reaches the
        same verdict; `line` is printed by the lowest-numbered one (among those it can see
        alive on this machine if `same_machine_only`), or always if `survivors_exclude` is None."""
        self._ending.acquire()
        if line is not None and survivors_exclude is not None:
            survivors = [r for r in range(self.world_size) if r not in survivors_exclude
                         and self._states.get(r) not in _ENDED
                         and (not same_machine_only or r == self.rank
                              or (r in self._members and self._members[r].machine == self._me.machine))]
            if min(survivors, default=self.rank) != self.rank:
                line = None
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        if self._store_usable(time.monotonic()):
            try:
                self._publish(state, final=True)
            except dist.DistError:
                pass
        sys.stdout.flush()
        os._exit(code)


_WATCH: JobWatch | None = None


def _start_watch(watch: JobWatch) -> None:
    """Route SIGTERM to the watch (see JobWatch) and start it; main thread only."""
    global _WATCH
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watch thread acts on it
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    # A process forked without exec would share the pipe: its SIGTERM must not end this one.
    os.register_at_fork(after_in_child=_forget_sigterm_routing)
    _WATCH = watch
    watch.start(read_fd)


def stop_cleanly_on_sigterm(handler: Callable[[], None], grace_s: float) -> None:
    """Let the main thread act on SIGTERM (and SIGINT) instead of the watch ending the process at
    once: a server finishes its step, answers its clients and leaves with every rank together.
    The watch still ends this rank if it has not exited `grace_s` after a SIGTERM."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: handler())
    if _WATCH is not None:
        _WATCH.sigterm_grace_s = grace_s


def _forget_sigterm_routing() -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# Leaving


def _say_error_once(error: UserError) -> None:
    """Print `error` once for the whole job. Every rank validates the same inputs, so all
    usually fail together: rank 0 says it, and its exit makes torchrun end the others. A
    rank that fails first must not exit before rank 0 has spoken (torchrun would kill rank 0
    mid-way), so it waits; if it is still alive after that, the error was its own to say."""
    rank = _rank()
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    time.sleep(OTHER_RANKS_ERROR_GRACE_S)
    print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main: bad input becomes one line on stderr and exit status 1 on every
    rank; Ctrl-C exits quietly with 130; any other exception is printed by the rank it happened
    on (unless a lost rank explains it: then that is the one line) and ends every rank at once."""
    code = 0
    try:
        main()
    except UserError as e:
        _say_error_once(e)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
    except Exception:
        if _WATCH is not None:
            _WATCH.explain_failure()
        traceback.print_exc()
        code = 1
    if _WATCH is not None:
        _WATCH.leave(DONE if code == 0 else FAILED)
    # No destroy_process_group(): under NCCL it waits for CUDA graphs that captured collectives
    # (a compiled decode step), so a finished --compile run would never exit, and after an error
    # it would wait for peers that may never come. Leaving without interpreter teardown also
    # avoids torch 2.13's occasional abort in exit-time destructors with gloo and a DeviceMesh.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
