"""Building and loading the project's small native libraries (shm_collectives.c, cpu_linear.c
with cpu_ops.cpp).

They use no torch headers but the header-only stable ABI, so the system's compiler builds each
in a few seconds, once per sources, compiler and flags: the result is kept in ~/.cache/tp-llama
(XDG_CACHE_HOME) and loaded with ctypes. Whatever goes wrong (no compiler, a failing or hanging
one, an unwritable or untrustworthy cache, a library that will not load), callers fall back
(to torch's own operators, or to cpu_linear.c alone), and rank 0 says why in one line.

Every rank loads what the cache holds, so it is trusted only if it cannot hold someone else's
library: a folder of this user's (created 0700) that no one else can write, and a file of this
user's, opened without following links, that is the one loaded. Otherwise the library is built
in a private temporary folder for this process alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from llama.distributed import log

# A build takes about a second; a compiler that takes this long is stuck (a wrapper waiting on
# a lock, a network file system), and the torch fallback is better than a hung start.
BUILD_TIMEOUT_S = 120
# Descriptors of loaded libraries, kept open: each was loaded by its /proc/self/fd name, which
# the dynamic loader remembers and must never see reused for another library.
_loaded_fds: list[int] = []


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-llama"


def _fall_back(source: Path, why: str, instead: str) -> None:
    log(f"warning: {source.name} not built ({why}); {instead}", file=sys.stderr)


def _compiler() -> list[str] | None:
    """CC split as a shell would (`ccache gcc`), else cc or gcc from PATH."""
    command = shlex.split(os.environ.get("CC", ""))
    if not command:
        found = shutil.which("cc") or shutil.which("gcc")
        command = [found] if found else []
    return command if command and shutil.which(command[0]) else None


def has_compiler() -> bool:
    """Whether a C compiler is found (CC, else cc or gcc)."""
    return _compiler() is not None


def _is_private(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted_cache() -> Path | None:
    """The cache folder, created 0700 if missing, or None if it is not this user's alone."""
    path = _cache_dir()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISDIR(st.st_mode) and _is_private(st) else None


def _load(path: Path) -> ctypes.CDLL:
    """The library at `path`, which must be a regular file of this user's that no one else can
    write (not a link): opened once, checked, and loaded through that open descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _is_private(st):
            raise OSError(f"{path} is not a private file of this user's")
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    _loaded_fds.append(fd)
    return lib


def _compile(command: list[str], sources: tuple[Path, ...], link: tuple[str, ...], target: Path) -> str | None:
    """Compile into `target` (written under a temporary name, synced, renamed): None, or why not."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
    except OSError as e:
        return f"cannot write to {target.parent}: {e.strerror or e}"
    try:
        result = subprocess.run([*command, "-o", tmp, *map(str, sources), *link], capture_output=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines() or [""]
            # the first error, not the last line (GCC ends an error with the source line and a caret)
            first_error = next((line for line in lines if "error:" in line), lines[-1])
            return f"{shlex.join(command[:1])} exited with status {result.returncode}: {first_error.strip()[:200]}"
        with open(tmp, "rb") as f:  # on disk before the name points at it: no empty file after a crash
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return None
    except subprocess.TimeoutExpired:
        return f"the compiler ran longer than {BUILD_TIMEOUT_S} s"
    except OSError as e:
        return f"{command[0]}: {e.strerror or e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(source: Path, flags: tuple[str, ...] = (), *, also: tuple[Path, ...] = (), link: tuple[str, ...] = (),
          instead: str = "using torch's own operators instead") -> ctypes.CDLL | None:
    """`source` (with the sources `also`, one shared library: the compiler driver picks each
    one's language by its suffix; `link`: libraries after them) compiled and loaded, or None
    (after one logged line ending in `instead`) if it cannot be. Ranks building it at the same
    time each compile to a temporary name and rename it into place, so none loads a half-written
    file; a cached library that does not load (truncated, foreign) is rebuilt once."""
    compiler = _compiler()
    if compiler is None:
        cc = os.environ.get("CC", "")
        _fall_back(source, f"no C compiler: CC={cc!r} is not a command" if cc.strip() else "no C compiler: no cc or "
                   "gcc on PATH; install one or set CC", instead)
        return None
    sources = (source, *also)
    command = [*compiler, "-O3", "-shared", "-fPIC", *flags]
    contents = b"".join(path.read_bytes() for path in sources)
    key = hashlib.sha256(contents + " ".join((*command, *link, os.uname().machine)).encode()).hexdigest()[:16]
    cache = _trusted_cache()
    folder = cache or Path(tempfile.mkdtemp(prefix="tp-llama-"))
    target = folder / f"{source.stem}-{key}.so"
    try:
        for attempt in (1, 2):
            if not target.exists() and not target.is_symlink():
                why = _compile(command, sources, link, target)
                if why:
                    _fall_back(source, why, instead)
                    return None
            try:
                return _load(target)
            except OSError as e:
                if attempt == 2:
                    _fall_back(source, f"{target} does not load: {e}", instead)
                    return None
                target.unlink(missing_ok=True)  # truncated or foreign: build it again
    finally:
        if cache is None:  # loaded libraries stay mapped without their file
            shutil.rmtree(folder, ignore_errors=True)
