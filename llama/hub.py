"""Fetch Meta-format Llama checkpoints from the Hugging Face Hub and check what arrived.

huggingface_hub does the transfers (its cache layout, parallel workers, progress bars, retries
that resume a dropped file with a Range request, and skipping files already cached). This module
picks the files, checks disk space before starting, verifies the result and turns the client's
exceptions into one-line UserErrors.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, is_offline_mode, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects, tqdm

from llama.errors import UserError

_META_FILES = ("params.json", "tokenizer.model", "consolidated.*.pth", "checklist.chk", "tokenizer_checklist.chk",
               "LICENSE*", "USE_POLICY.md")
# Llama 2 repositories hold the Meta-format files at the top; Llama 3.x ones keep them under
# original/, beside HF-format safetensors that would double the download.
DEFAULT_PATTERNS = (*_META_FILES, *(f"original/{name}" for name in _META_FILES))
META_FOLDERS = ("", "original")

_MD5_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")
_CHUNK = 16 << 20


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name, or "git-sha1" (the git blob id the Hub records for non-LFS files)
    digest: str
    source: str  # where the expected digest comes from, for the error message


def say(message: str) -> None:
    """Status lines go to stderr, keeping stdout for the folder path that scripts capture."""
    print(message, file=sys.stderr, flush=True)


def download(repo_id: str, cache_dir: Path, *, revision: str = "main", token: str | None = None,
             include: Sequence[str] = (), exclude: Sequence[str] = (), max_workers: int = 8,
             force_download: bool = False, verify: bool = True) -> Path:
    """Download the Meta-format files of `repo_id` into the Hugging Face cache at `cache_dir`
    (resuming what an earlier run left, or offline from the cache) and return the folder that
    holds params.json. `token=None` means HF_TOKEN or the token saved by `hf auth login`."""
    _ensure_writable(cache_dir)
    patterns, ignored = [*DEFAULT_PATTERNS, *include], list(exclude) or None
    api = HfApi(token=token)
    try:
        # Pin the commit once so the file list, the checksums and the download all describe the
        # same snapshot; this also records refs/<revision> so offline runs find the snapshot later.
        pinned = api.resolve_revision(repo_id, revision=revision, cache_dir=cache_dir)
        hub_files = _hub_files(api, repo_id, pinned.resolved)
        if hub_files is None:
            reason = "offline mode (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the Hub is not reachable"
            say(f"{reason}: using the copy of {repo_id} cached in {cache_dir}")
        else:
            wanted = [hub_files[name] for name in filter_repo_objects(
                hub_files, allow_patterns=patterns, ignore_patterns=ignored)]
            missing = [f for f in wanted
                       if force_download or not _is_cached(repo_id, f.rfilename, cache_dir, pinned.resolved)]
            needed = sum(f.size or 0 for f in missing)
            say(f"{repo_id} at {revision} (commit {pinned.resolved[:10]}): {len(wanted)} files, "
                f"{len(missing)} to download ({_gigabytes(needed)}) into {cache_dir}")
            _check_disk_space(needed, cache_dir)
        snapshot = Path(snapshot_download(repo_id, revision=pinned, cache_dir=cache_dir, token=token,
                                          allow_patterns=patterns, ignore_patterns=ignored,
                                          max_workers=max_workers, force_download=force_download))
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, RevisionResolutionError,
            httpx2.TransportError, OSError) as error:
        raise UserError(_explain(error, repo_id, revision, cache_dir, token)) from None
    folder = meta_folder(snapshot, repo_id)
    if verify:
        verify_files(snapshot, folder, hub_files)
    return folder


def _hub_files(api: HfApi, repo_id: str, commit: str) -> dict[str, RepoSibling] | None:
    """The repo's files with sizes and checksums, or None when the Hub cannot be reached (then
    snapshot_download serves the cache or says what is missing)."""
    try:
        info = api.model_info(repo_id, revision=commit, files_metadata=True)
    except (OfflineModeIsEnabled, httpx2.TransportError):  # what huggingface_hub itself falls back on
        return None
    except KeyError as missing:  # the client cannot read a file entry that lacks a field, e.g. an LFS sha256
        say(f"the Hub's file list lacks {missing} for some file: no file can be checked against the Hub")
        info = api.model_info(repo_id, revision=commit)  # names only
    return {f.rfilename: f for f in info.siblings or ()}


def _is_cached(repo_id: str, filename: str, cache_dir: Path, commit: str) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=commit), str)


def _ensure_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache_dir).close()
    except OSError as e:
        raise UserError(f"--model_path {cache_dir}: cannot write there ({e.strerror or e}); "
                        f"choose a folder you can write to") from None


def _check_disk_space(needed: int, cache_dir: Path) -> None:
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise UserError(f"--model_path {cache_dir}: the download needs {_gigabytes(needed)} but only "
                        f"{_gigabytes(free)} is free there; free some space or choose another --model_path")


def _gigabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def meta_folder(snapshot: Path, repo_id: str) -> Path:
    """The folder of the snapshot that holds the Meta-format checkpoint (params.json)."""
    for name in META_FOLDERS:
        if (snapshot / name / "params.json").is_file():
            return snapshot / name
    raise UserError(f"--model_name {repo_id}: no params.json at the top or under original/, so this is not a "
                    f"Meta-format checkpoint; use the repository without -hf (e.g. meta-llama/Llama-2-7b) "
                    f"or a Llama 3.x one (e.g. meta-llama/Llama-3.1-8B)")


def _explain(error: Exception, repo_id: str, revision: str, cache_dir: Path, token: str | None) -> str:
    """One line naming the flag and the fix for what huggingface_hub raised (order matters:
    GatedRepoError is a RepositoryNotFoundError, and every Hub error is an OSError)."""
    endpoint = hub_constants.ENDPOINT
    token_source = _token_source(token)
    if isinstance(error, HFValidationError):
        return f"--model_name {repo_id}: not a repository id; use owner/name, e.g. meta-llama/Llama-2-7b"
    if isinstance(error, GatedRepoError):
        if error.response.status_code == 401:
            return (f"{repo_id} is gated and no token was sent: log in with `hf auth login` (or pass --token, or set "
                    f"HF_TOKEN) as an account that has been granted access at {endpoint}/{repo_id}")
        return (f"{repo_id} is gated and the account of {token_source} has no access: request it at "
                f"{endpoint}/{repo_id} and wait for approval, or log in as an account that has it")
    if isinstance(error, RepositoryNotFoundError):
        return (f"--model_name {repo_id}: no such model on {endpoint} (or it is private); check the name, "
                f"e.g. meta-llama/Llama-2-7b or meta-llama/Llama-3.1-8B")
    if isinstance(error, RevisionNotFoundError):
        return (f"--revision {revision}: {repo_id} has no branch, tag or commit of that name; "
                f"use main or a commit from {endpoint}/{repo_id}/commits/main")
    if isinstance(error, HfHubHTTPError) and error.response.status_code == 401:
        return (f"the Hub rejected the token from {token_source}: create one at {endpoint}/settings/tokens "
                f"and log in again with `hf auth login` (or pass it with --token)")
    if isinstance(error, HfHubHTTPError):
        return (f"the Hub answered {error.response.status_code} for {error.response.url}; run the same command "
                f"again later (files already complete are kept)")
    if isinstance(error, (LocalEntryNotFoundError, RevisionResolutionError)):
        cached = f"{repo_id} at {revision} is not (fully) cached in --model_path {cache_dir}"
        if is_offline_mode():
            return f"HF_HUB_OFFLINE=1 is set and {cached}; unset HF_HUB_OFFLINE to download it"
        return f"cannot reach the Hub at {endpoint} and {cached}; check the network connection (or HF_ENDPOINT)"
    if isinstance(error, httpx2.TransportError):
        return (f"lost the connection to {endpoint} while downloading {repo_id} ({error}); run the same command "
                f"again to resume (files already complete are kept)")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"downloading {repo_id} into --model_path {cache_dir} failed: {first_line}; fix that and run the "
            f"same command again (files already complete are kept)")


def _token_source(token: str | None) -> str:
    if token:
        return "--token"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    return "the saved login (`hf auth login`)"


def verify_files(snapshot: Path, folder: Path, hub_files: dict[str, RepoSibling] | None) -> None:
    """Hash every downloaded file against every checksum there is for it: the repo's md5
    checklists (Llama 2) and the sha256 or git blob id the Hub records (when it can be reached);
    raise naming the first corrupt file. Each file is read once, for all its checksums."""
    expected: dict[Path, list[Checksum]] = {}
    for chk in sorted(folder.glob("*checklist.chk")):
        for path, checksum in read_checklist(chk).items():
            expected.setdefault(path, []).append(checksum)
    if hub_files is not None:
        for name in _relative_files(snapshot):
            checksum = _hub_checksum(hub_files[name]) if name in hub_files else None
            if checksum is not None:
                expected.setdefault(snapshot / name, []).append(checksum)
            elif snapshot / name not in expected:
                say(f"not verified: {name} (the Hub records no checksum for it)")
    elif not expected:
        say("not verified: there is no checklist.chk and the Hub's checksums need a connection")
        return
    if not expected:
        return
    with tqdm(total=sum(p.stat().st_size for p in expected), unit="B", unit_scale=True, desc="Verifying") as bar:
        for path, checksums in expected.items():
            actual = _digests(path, {c.algorithm for c in checksums}, bar)
            for checksum in checksums:
                if actual[checksum.algorithm] != checksum.digest.lower():
                    raise UserError(f"{path.relative_to(snapshot)} is corrupt: {checksum.algorithm} "
                                    f"{actual[checksum.algorithm]} does not match {checksum.digest} from "
                                    f"{checksum.source}; run again with --force_download")
    sources = sorted({c.source for checksums in expected.values() for c in checksums})
    say(f"verified {len(expected)} files against {', '.join(sources)}")


def read_checklist(path: Path) -> dict[Path, Checksum]:
    """Parse md5sum lines (`<hex>  <file>`); anything else (an HTML error page saved under
    that name, say) is an error rather than an empty, always-passing checklist."""
    expected = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _MD5_LINE.fullmatch(line.strip())
        if match is None or Path(match[2]).is_absolute() or ".." in Path(match[2]).parts:
            raise UserError(f"{path.name} in {path.parent} is not a list of md5 sums (line {number}: "
                            f"{line.strip()[:40]!r}); run again with --force_download, "
                            f"or --skip_verify to trust the files")
        file = path.parent / match[2]
        if not file.is_file():
            raise UserError(f"{path.name} lists {match[2]} but it was not downloaded; drop the --exclude pattern "
                            f"that skips it, or pass --skip_verify")
        expected[file] = Checksum("md5", match[1], path.name)
    if not expected:
        raise UserError(f"{path.name} in {path.parent} is empty; run again with --force_download, "
                        f"or --skip_verify to trust the files")
    return expected


def _hub_checksum(file: RepoSibling) -> Checksum | None:
    """The checksum the Hub records for `file`, or None where its answer has none."""
    if file.lfs is not None:
        return Checksum("sha256", file.lfs.sha256, "the Hub's sha256") if file.lfs.sha256 else None
    return Checksum("git-sha1", file.blob_id, "the Hub's git blob id") if file.blob_id else None


def _relative_files(snapshot: Path) -> Iterable[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _digests(path: Path, algorithms: set[str], bar: tqdm) -> dict[str, str]:
    """The file's digest by each algorithm, from one read."""
    hashers = {}
    for algorithm in algorithms:
        if algorithm == "git-sha1":  # git hashes a "blob <size>\0" header before the content
            hashers[algorithm] = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
        else:
            hashers[algorithm] = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}
