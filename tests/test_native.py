"""llama/native.py: every way a build or a cached library can fail falls back to torch with one
line, and the cache is used only when no one else can have put a library in it."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llama import native

REPO = Path(__file__).resolve().parent.parent
SOURCE = "int answer(void) { return 42; }\n"


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "answer.c"
    path.write_text(SOURCE)
    return path


def cached(tmp_path):
    folder = tmp_path / "cache" / "tp-llama"
    return sorted(folder.iterdir()) if folder.exists() else []


def one_warning(capsys, *fragments):
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: answer.c not built ("), err
    assert all(f in err[0] for f in fragments), err[0]


def test_builds_into_a_private_cache(tmp_path, source, capsys):
    assert native.build(source).answer() == 42
    [library] = cached(tmp_path)
    assert stat.S_IMODE((tmp_path / "cache" / "tp-llama").stat().st_mode) == 0o700
    assert library.name.startswith("answer-") and library.suffix == ".so"
    assert native.build(source).answer() == 42 and cached(tmp_path) == [library]  # loaded from the cache
    assert capsys.readouterr().err == ""


def test_compiler_with_arguments(tmp_path, source, monkeypatch):
    monkeypatch.setenv("CC", "env LC_ALL=C cc")
    assert native.build(source).answer() == 42


@pytest.mark.parametrize("cc, fragment", [("/nonexistent/cc", "no C compiler: CC='/nonexistent/cc' is not a command"),
                                          ("false", "false exited with status 1")])
def test_missing_or_failing_compiler(tmp_path, source, monkeypatch, capsys, cc, fragment):
    monkeypatch.setenv("CC", cc)
    assert native.build(source) is None
    one_warning(capsys, fragment)
    assert cached(tmp_path) == []  # no temporary file left behind


def test_a_compile_error_is_named(tmp_path, source, capsys):
    """The warning quotes the compiler's first error, not its last line (GCC's caret under the code)."""
    source.write_text("int answer(void) { return 42 }\n")
    assert native.build(source) is None
    one_warning(capsys, "answer.c:1:", "error")


def test_compiler_that_hangs(tmp_path, source, monkeypatch, capsys):
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setenv("CC", str(hang))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)
    assert native.build(source) is None
    one_warning(capsys, "the compiler ran longer than 1 s")
    assert cached(tmp_path) == []


def test_truncated_library_is_rebuilt_once(tmp_path, source, capsys):
    # Cached by another process: cutting short a library this process has mapped would make its
    # next touch of the mapping (at exit, say) a bus error.
    build = f"from pathlib import Path; from llama import native; assert native.build(Path({str(source)!r}))"
    subprocess.run([sys.executable, "-c", build], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    [library] = cached(tmp_path)
    library.write_bytes(library.read_bytes()[:100])  # a power loss before the data reached the disk
    assert native.build(source).answer() == 42
    assert capsys.readouterr().err == ""


def test_library_that_never_loads(tmp_path, source, monkeypatch, capsys):
    """A compiler that "succeeds" without writing a library (as a noexec cache would refuse one):
    rebuilt once, then one line."""
    fake = tmp_path / "fake-cc"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho junk > "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert native.build(source) is None
    one_warning(capsys, "does not load")


def test_unusable_cache_builds_in_a_private_folder(tmp_path, source, monkeypatch, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    assert native.build(source).answer() == 42
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["group-writable folder", "link", "file of another user"])
def test_untrusted_cache_is_not_loaded(tmp_path, source, how):
    """Another user's library, planted where the cache would look, is never loaded."""
    assert native.build(source) is not None
    [library] = cached(tmp_path)
    planted = tmp_path / "planted.so"
    planted.write_bytes(library.read_bytes().replace(b"answer", b"ANSWER"))  # a library that is not ours
    library.unlink()
    if how == "group-writable folder":
        os.rename(planted, library)
        library.parent.chmod(0o770)
    elif how == "link":
        library.symlink_to(planted)
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give a file to another user")
        os.rename(planted, library)
        os.chown(library, 12345, 12345)
    lib = native.build(source)
    assert lib.answer() == 42 and not hasattr(lib, "ANSWER")


def test_warning_on_rank_0_only(tmp_path, source, monkeypatch, capsys):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("RANK", "1")
    assert native.build(source) is None
    assert capsys.readouterr().err == ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
