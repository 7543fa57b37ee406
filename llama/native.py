"""Building and loading the project's small C libraries (shm_collectives.c, cpu_linear.c).

They use no torch headers, so a plain C compiler builds each in about a second, once per
source, compiler and flags: the result is kept in ~/.cache/tp-llama (XDG_CACHE_HOME) and
loaded with ctypes. Without a compiler, callers fall back to torch's own operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-llama"


def build(source: Path, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source` compiled into a shared library and loaded, or None if it cannot be compiled.
    Ranks building it at the same time each compile to a temporary name and rename it into
    place, so none loads a half-written file."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    command = (compiler, "-O3", "-shared", "-fPIC", *flags)
    key = hashlib.sha256(source.read_bytes() + " ".join((*command, os.uname().machine)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        if subprocess.run([*command, "-o", tmp, str(source)], capture_output=True).returncode != 0:
            os.unlink(tmp)
            return None
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))
