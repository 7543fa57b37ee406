"""download.py end to end: the real script and the real huggingface_hub client against a fake
Hub on 127.0.0.1 (tests/hub_server.py); assertions on the files on disk and the exact messages."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import FakeHub, FakeRepo

REPO = Path(__file__).resolve().parent.parent
COMMIT = "365ffa8f1a6c455d3e2028ae658236b4b85ba824"
MiB = 1 << 20


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _md5_lines(files: dict[str, bytes], names: list[str]) -> bytes:
    return "".join(f"{hashlib.md5(files[n]).hexdigest()}  {n}\n" for n in names).encode()


def llama2_files() -> dict[str, bytes]:
    files = {
        "params.json": json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5}).encode(),
        "tokenizer.model": _bytes(5000, 1),
        "consolidated.00.pth": _bytes(200_000, 2),
        "consolidated.01.pth": _bytes(200_000, 3),
        "LICENSE.txt": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy\n",
        "README.md": b"# Llama 2\n",
        "Responsible-Use-Guide.pdf": _bytes(3000, 4),
        ".gitattributes": b"*.pth filter=lfs diff=lfs merge=lfs -text\n",
    }
    files["checklist.chk"] = _md5_lines(files, ["consolidated.00.pth", "consolidated.01.pth", "params.json"])
    files["tokenizer_checklist.chk"] = _md5_lines(files, ["tokenizer.model"])
    return files


LLAMA2_LFS = {"tokenizer.model", "consolidated.00.pth", "consolidated.01.pth", "Responsible-Use-Guide.pdf"}
LLAMA2_META = {"params.json", "tokenizer.model", "consolidated.00.pth", "consolidated.01.pth", "LICENSE.txt",
               "USE_POLICY.md", "checklist.chk", "tokenizer_checklist.chk"}

LLAMA3_FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "model-00001-of-00002.safetensors": _bytes(30_000, 5),
    "model-00002-of-00002.safetensors": _bytes(30_000, 6),
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "LICENSE": b"LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n",
    "USE_POLICY.md": b"# Llama 3.1 Acceptable Use Policy\n",
    "README.md": b"# Llama 3.1\n",
    "original/params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}',
    "original/tokenizer.model": _bytes(4000, 7),
    # Larger than huggingface_hub's 10 MiB read chunk, so a cut after 11 MiB resumes mid-file.
    "original/consolidated.00.pth": _bytes(12 * MiB, 8),
}
LLAMA3_LFS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "original/tokenizer.model",
              "original/consolidated.00.pth"}
LLAMA3_META = {"LICENSE", "USE_POLICY.md", "original/params.json", "original/tokenizer.model",
               "original/consolidated.00.pth"}


def _wrong_md5_files() -> dict[str, bytes]:
    files = llama2_files()
    files["checklist.chk"] = files["checklist.chk"].replace(hashlib.md5(files["consolidated.00.pth"]).hexdigest()
                                                            .encode(), b"0" * 32)
    return files


REPOS = {
    "meta-llama/Llama-2-7b": FakeRepo(llama2_files(), LLAMA2_LFS, COMMIT),
    "meta-llama/Llama-2-13b": FakeRepo(llama2_files(), LLAMA2_LFS, COMMIT, gated=True, granted_tokens={"hf_granted"}),
    "meta-llama/Llama-3.1-8B": FakeRepo(LLAMA3_FILES, LLAMA3_LFS, COMMIT),
    "meta-llama/Llama-2-7b-hf": FakeRepo({"config.json": b"{}", "model.safetensors": b"0" * 100, "LICENSE.txt": b"L"},
                                         {"model.safetensors"}, COMMIT),
    "test/wrong-md5": FakeRepo(_wrong_md5_files(), LLAMA2_LFS, COMMIT),
    "test/html-checklist": FakeRepo({**llama2_files(), "checklist.chk": b"<!DOCTYPE html>\n<html><body>Error</body>"},
                                    LLAMA2_LFS, COMMIT),
    "test/no-blob-id": FakeRepo(LLAMA3_FILES, LLAMA3_LFS, COMMIT, no_checksum={"original/params.json"}),
    "test/no-sha256": FakeRepo(LLAMA3_FILES, LLAMA3_LFS, COMMIT, no_checksum={"original/tokenizer.model"}),
    "test/huge": FakeRepo({"params.json": b"{}", "consolidated.00.pth": b"0"}, {"consolidated.00.pth"}, COMMIT,
                          declared_sizes={"consolidated.00.pth": 1 << 60}),
}


@pytest.fixture
def hub():
    with FakeHub(REPOS, valid_tokens={"hf_granted", "hf_not_granted"}) as server:
        yield server


def download(hub: FakeHub, tmp_path: Path, *args: str, progress_bars: bool = False,
             **env: str) -> subprocess.CompletedProcess:
    """Run `python download.py ARGS` in tmp_path (so the default --model_path is tmp_path/model), with
    its Hugging Face home, and so any saved token, there too."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    base.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    if not progress_bars:
        base["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return subprocess.run([sys.executable, str(REPO / "download.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**base, **env})


def snapshot_of(tmp_path: Path, repo_id: str) -> Path:
    return (tmp_path / "model").resolve() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_fails_with(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1 and the one-line error last on stderr (after any status lines), no traceback."""
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(f"\nerror: {message}\n") or result.stderr == f"error: {message}\n", result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_llama2_fetches_meta_files_verifies_and_then_works_from_the_cache(hub, tmp_path):
    first = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", progress_bars=True)
    assert first.returncode == 0, first.stderr
    snapshot = snapshot_of(tmp_path, "meta-llama/Llama-2-7b")
    assert first.stdout == f"{snapshot}\n"
    files = llama2_files()
    assert files_under(snapshot) == {name: files[name] for name in LLAMA2_META}
    assert "Fetching 8 files" in first.stderr and "Verifying" in first.stderr
    # every file against the Hub's checksums, and those the checklists list against them too
    assert ("verified 8 files against checklist.chk, the Hub's git blob id, the Hub's sha256, "
            "tokenizer_checklist.chk") in first.stderr

    hub.clear()
    cached = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b")
    assert cached.returncode == 0 and cached.stdout == first.stdout
    assert [request for request in hub.requests if "/resolve/" in request[1]] == []
    assert "8 files, 0 to download (0.00 GB)" in cached.stderr

    hub.clear()
    offline = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == first.stdout and hub.requests == []
    assert "verified 4 files against checklist.chk, tokenizer_checklist.chk" in offline.stderr


def test_llama3_prints_the_original_folder_and_checks_the_hubs_checksums(hub, tmp_path):
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B")
    assert result.returncode == 0, result.stderr
    snapshot = snapshot_of(tmp_path, "meta-llama/Llama-3.1-8B")
    assert result.stdout == f"{snapshot / 'original'}\n"
    assert files_under(snapshot) == {name: LLAMA3_FILES[name] for name in LLAMA3_META}
    assert "verified 5 files against the Hub's git blob id, the Hub's sha256" in result.stderr

    hub.clear()
    more = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B", "--include", "*.safetensors",
                    "model.safetensors.index.json")
    assert more.returncode == 0, more.stderr
    assert sorted(hub.downloads()) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"]

    offline = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0 and offline.stdout == result.stdout
    assert "not verified: there is no checklist.chk and the Hub's checksums need a connection" in offline.stderr


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path):
    hub.drop_once["original/consolidated.00.pth"] = 11 * MiB
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B", "--exclude", "original/tokenizer.*")
    assert result.returncode == 0, result.stderr
    ranges = [r for _, path, r in hub.requests if path.endswith("/resolve/" + COMMIT + "/original/consolidated.00.pth")]
    assert ranges[-2:] == [None, f"bytes={10 * MiB}-"]  # resumed after the last whole 10 MiB chunk it kept
    weights = snapshot_of(tmp_path, "meta-llama/Llama-3.1-8B") / "original"
    assert (weights / "consolidated.00.pth").read_bytes() == LLAMA3_FILES["original/consolidated.00.pth"]
    assert not (weights / "tokenizer.model").exists()


def test_a_second_run_after_a_failure_fetches_only_what_is_missing(hub, tmp_path):
    hub.fail.add("consolidated.01.pth")
    failed = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b")
    assert_fails_with(failed, f"the Hub answered 500 for {hub.url}/meta-llama/Llama-2-7b/resolve/{COMMIT}/"
                              "consolidated.01.pth; run the same command again later (files already complete are kept)")
    hub.fail.clear()
    hub.clear()
    again = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b")
    assert again.returncode == 0, again.stderr
    assert hub.downloads() == ["consolidated.01.pth"]
    assert "8 files, 1 to download (0.00 GB)" in again.stderr


def test_gated_repo_needs_a_token_with_access(hub, tmp_path):
    page = f"{hub.url}/meta-llama/Llama-2-13b"
    anonymous = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-13b")
    assert_fails_with(anonymous, "meta-llama/Llama-2-13b is gated and no token was sent: log in with `hf auth login` "
                                 "(or pass --token, or set HF_TOKEN) as an account that has been granted access at "
                                 f"{page}")
    not_granted = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-13b", "--token", "hf_not_granted")
    assert_fails_with(not_granted, "meta-llama/Llama-2-13b is gated and the account of --token has no access: "
                                   f"request it at {page} and wait for approval, or log in as an account that has it")
    assert "hf_not_granted" not in not_granted.stdout + not_granted.stderr

    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text("hf_granted")  # what `hf auth login` saves
    logged_in = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-13b")
    assert logged_in.returncode == 0, logged_in.stderr
    assert (snapshot_of(tmp_path, "meta-llama/Llama-2-13b") / "consolidated.01.pth").is_file()
    assert "hf_granted" not in logged_in.stdout + logged_in.stderr


@pytest.mark.parametrize("flag, env, source", [(("--token", "hf_bogus"), {}, "--token"),
                                               ((), {"HF_TOKEN": "hf_bogus"}, "HF_TOKEN")])
def test_a_rejected_token_names_where_it_came_from(hub, tmp_path, flag, env, source):
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", *flag, **env)
    assert_fails_with(result, f"the Hub rejected the token from {source}: create one at {hub.url}/settings/tokens "
                              "and log in again with `hf auth login` (or pass it with --token)")
    assert "hf_bogus" not in result.stdout + result.stderr


def test_unknown_repository_revision_and_name(hub, tmp_path):
    missing = download(hub, tmp_path, "--model_name", "meta-llama/Llama-9-7b")
    assert_fails_with(missing, f"--model_name meta-llama/Llama-9-7b: no such model on {hub.url} (or it is private); "
                               "check the name, e.g. meta-llama/Llama-2-7b or meta-llama/Llama-3.1-8B")
    revision = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", "--revision", "v9")
    assert_fails_with(revision, "--revision v9: meta-llama/Llama-2-7b has no branch, tag or commit of that name; "
                                f"use main or a commit from {hub.url}/meta-llama/Llama-2-7b/commits/main")
    malformed = download(hub, tmp_path, "--model_name", "meta-llama/Llama 2/7b")
    assert_fails_with(malformed, "--model_name meta-llama/Llama 2/7b: not a repository id; use owner/name, "
                                 "e.g. meta-llama/Llama-2-7b")


def test_hf_format_repository_is_refused(hub, tmp_path):
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b-hf")
    assert_fails_with(result, "--model_name meta-llama/Llama-2-7b-hf: no params.json at the top or under original/, "
                              "so this is not a Meta-format checkpoint; use the repository without -hf "
                              "(e.g. meta-llama/Llama-2-7b) or a Llama 3.x one (e.g. meta-llama/Llama-3.1-8B)")


def test_offline_or_unreachable_with_nothing_cached(hub, tmp_path):
    model = (tmp_path / "model").resolve()
    offline = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", "-o", str(model), HF_HUB_OFFLINE="1")
    assert_fails_with(offline, f"HF_HUB_OFFLINE=1 is set and meta-llama/Llama-2-7b at main is not (fully) cached in "
                               f"--model_path {model}; unset HF_HUB_OFFLINE to download it")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    unreachable = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", "-o", str(model),
                           HF_ENDPOINT=nowhere)
    assert_fails_with(unreachable, f"cannot reach the Hub at {nowhere} and meta-llama/Llama-2-7b at main is not "
                                   f"(fully) cached in --model_path {model}; check the network connection "
                                   "(or HF_ENDPOINT)")


def test_wrong_md5_in_checklist_names_the_file(hub, tmp_path):
    result = download(hub, tmp_path, "--model_name", "test/wrong-md5")
    actual = hashlib.md5(llama2_files()["consolidated.00.pth"]).hexdigest()
    assert_fails_with(result, f"consolidated.00.pth is corrupt: md5 {actual} does not match {'0' * 32} from "
                              "checklist.chk; run again with --force_download")
    skipped = download(hub, tmp_path, "--model_name", "test/wrong-md5", "--skip_verify")
    assert skipped.returncode == 0 and skipped.stdout == f"{snapshot_of(tmp_path, 'test/wrong-md5')}\n"


def test_a_checklist_that_is_not_md5_lines_is_an_error(hub, tmp_path):
    result = download(hub, tmp_path, "--model_name", "test/html-checklist")
    assert_fails_with(result, f"checklist.chk in {snapshot_of(tmp_path, 'test/html-checklist')} is not a list of md5 "
                              "sums (line 1: '<!DOCTYPE html>'); run again with --force_download, or --skip_verify "
                              "to trust the files")


def test_files_a_checklist_leaves_out_are_checked_against_the_hub(hub, tmp_path):
    """Llama 2's checklists list the weights, not the licence: the Hub's checksum catches it."""
    hub.corrupt.add("LICENSE.txt")
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b")
    original = llama2_files()["LICENSE.txt"]
    served = bytes([original[0] ^ 0xFF]) + original[1:]
    blob_id = {content: hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() for content in (original, served)}
    assert_fails_with(result, f"LICENSE.txt is corrupt: git-sha1 {blob_id[served]} does not match "
                              f"{blob_id[original]} from the Hub's git blob id; run again with --force_download")


def test_corrupt_transfer_fails_against_the_hubs_sha256_and_force_download_repairs_it(hub, tmp_path):
    hub.corrupt.add("original/consolidated.00.pth")
    corrupt = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B")
    served = bytearray(LLAMA3_FILES["original/consolidated.00.pth"])
    served[0] ^= 0xFF
    assert_fails_with(corrupt, f"original/consolidated.00.pth is corrupt: sha256 {hashlib.sha256(served).hexdigest()} "
                               "does not match "
                               f"{hashlib.sha256(LLAMA3_FILES['original/consolidated.00.pth']).hexdigest()} from "
                               "the Hub's sha256; run again with --force_download")
    hub.corrupt.clear()
    repaired = download(hub, tmp_path, "--model_name", "meta-llama/Llama-3.1-8B", "--force_download")
    assert repaired.returncode == 0, repaired.stderr


def test_files_the_hub_lists_without_a_checksum_are_named_not_verified(hub, tmp_path):
    no_blob_id = download(hub, tmp_path, "--model_name", "test/no-blob-id")
    assert no_blob_id.returncode == 0, no_blob_id.stderr
    assert "not verified: original/params.json (the Hub records no checksum for it)" in no_blob_id.stderr
    assert "verified 4 files against the Hub's git blob id, the Hub's sha256" in no_blob_id.stderr

    # huggingface_hub cannot read an LFS entry without its sha256: then no file is checked
    no_sha256 = download(hub, tmp_path, "--model_name", "test/no-sha256")
    assert no_sha256.returncode == 0, no_sha256.stderr
    assert "the Hub's file list lacks 'sha256' for some file: no file can be checked against the Hub" \
        in no_sha256.stderr
    assert [line.removeprefix("not verified: ").split()[0] for line in no_sha256.stderr.splitlines()
            if line.startswith("not verified: ")] == sorted(LLAMA3_META)
    assert no_sha256.stdout == f"{snapshot_of(tmp_path, 'test/no-sha256') / 'original'}\n"


def test_disk_space_is_checked_before_downloading(hub, tmp_path):
    model = (tmp_path / "model").resolve()
    result = download(hub, tmp_path, "--model_name", "test/huge", "-o", str(model))
    free = re.search(r"only ([\d.]+ GB) is free", result.stderr)
    assert free is not None, result.stderr
    assert_fails_with(result, f"--model_path {model}: the download needs 1152921504.61 GB but only {free[1]} is free "
                              "there; free some space or choose another --model_path")
    assert hub.downloads() == []


def test_unwritable_model_path(hub, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", "-o", str(tmp_path / "a_file" / "model"))
    assert_fails_with(result, f"--model_path {tmp_path / 'a_file' / 'model'}: cannot write there (Not a directory); "
                              "choose a folder you can write to")


def test_excluding_a_file_the_checklist_lists_is_reported(hub, tmp_path):
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-7b", "--exclude", "consolidated.01.pth")
    assert_fails_with(result, "checklist.chk lists consolidated.01.pth but it was not downloaded; drop the --exclude "
                              "pattern that skips it, or pass --skip_verify")
    assert "consolidated.01.pth" not in hub.downloads()


def test_token_from_a_file_and_an_empty_token_is_an_error(hub, tmp_path):
    """--token shows in ps; --token_file does not. An empty token (an unset variable in
    `--token "$T"`) is an error, not an anonymous download."""
    (tmp_path / "token").write_text("hf_granted\n")
    result = download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-13b", "--token_file", str(tmp_path / "token"))
    assert result.returncode == 0, result.stderr
    assert_fails_with(download(hub, tmp_path, "--model_name", "meta-llama/Llama-2-13b", "--token", ""),
                      "--token: the token is empty; give a token, or neither flag to use HF_TOKEN or `hf auth login`")
