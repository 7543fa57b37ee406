"""Bad input: one line on rank 0, a non-zero exit on every rank, nothing half-written."""

import json
import os
import pickle
import shutil

import pytest

from helpers import LLAMA3_TINY, convert, make_meta_checkpoint, run_script, sentencepiece_32k_path


def assert_clean_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "[rank" not in result.stderr, "a rank printed a traceback"
    assert result.stdout == ""


@pytest.fixture(scope="module")
def meta(tmp_path_factory, small_sp_tokenizer):
    path = tmp_path_factory.mktemp("meta") / "ckpt"
    make_meta_checkpoint(path, small_sp_tokenizer, n_shards=2)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, meta):
    out = tmp_path_factory.mktemp("dcp") / "ckpt"
    convert(meta, out)
    return out


def run_convert(src, out, *extra, nproc=2):
    return run_script("convert_checkpoints.py", "--original_ckpt_dir", src, "--save_checkpoint_dir", out, *extra,
                      nproc=nproc)


def copy_with(meta, dest, edit_params=None, drop=()):
    shutil.copytree(meta, dest)
    for name in drop:
        (dest / name).unlink()
    if edit_params:
        params = json.loads((dest / "params.json").read_text())
        edit_params(params)
        (dest / "params.json").write_text(json.dumps(params))
    return dest


def test_missing_checkpoint_dir(tmp_path):
    assert_clean_error(run_convert(tmp_path / "nope", tmp_path / "out"), "--original_ckpt_dir", "missing or empty")


def test_empty_checkpoint_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_convert(tmp_path / "empty", tmp_path / "out"), "missing or empty")


def test_no_shards(tmp_path, meta):
    src = copy_with(meta, tmp_path / "src", drop=("consolidated.00.pth", "consolidated.01.pth"))
    assert_clean_error(run_convert(src, tmp_path / "out"), "no consolidated.*.pth")


def test_missing_shard(tmp_path, meta):
    src = copy_with(meta, tmp_path / "src", drop=("consolidated.00.pth",))
    assert_clean_error(run_convert(src, tmp_path / "out"), "not numbered 0..0")


def test_shard_count_differs_from_flag(tmp_path, meta):
    assert_clean_error(run_convert(meta, tmp_path / "out", "--model_parallel_size", "1"),
                       "--model_parallel_size 1", "2 consolidated")


def test_corrupt_shard(tmp_path, meta):
    src = copy_with(meta, tmp_path / "src")
    (src / "consolidated.01.pth").write_bytes(b"<html>not a checkpoint</html>")
    assert_clean_error(run_convert(src, tmp_path / "out"), "consolidated.01.pth", "not a readable")


def test_shapes_do_not_fit_params(tmp_path, meta):
    src = copy_with(meta, tmp_path / "src", edit_params=lambda p: p.update(multiple_of=256))
    assert_clean_error(run_convert(src, tmp_path / "out"), "feed_forward", "does not add up")


def test_params_missing_field(tmp_path, meta):
    src = copy_with(meta, tmp_path / "src", edit_params=lambda p: p.pop("dim"))
    assert_clean_error(run_convert(src, tmp_path / "out"), "params.json", "missing field(s) dim")


def test_tokenizer_size_differs_from_vocab(tmp_path, small_sp_tokenizer):
    make_meta_checkpoint(tmp_path / "src", small_sp_tokenizer, llama2_layout=False, **LLAMA3_TINY)
    result = run_convert(tmp_path / "src", tmp_path / "out", "--tokenizer_path", sentencepiece_32k_path())
    assert_clean_error(result, "--tokenizer_path", "32000 tokens", "vocab_size 256")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite(tmp_path, meta):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_error(run_convert(meta, out), "--save_checkpoint_dir", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_whole(tmp_path, meta):
    out = tmp_path / "out"
    convert(meta, out)
    (out / "model_args.json").write_text("{}")  # a converted checkpoint, damaged
    (tmp_path / "out.partial").mkdir()  # a folder of the user's that the old staging name took
    (tmp_path / "out.partial" / "keep.txt").write_text("precious")
    result = run_convert(meta, out, "--overwrite", nproc=1)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "model_args.json").read_text()) and (out / ".metadata").is_file()
    assert (tmp_path / "out.partial" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]  # no staging or old folder left


@pytest.mark.parametrize("where", ["input", "parent", "foreign"])
def test_overwrite_refuses_inputs_and_foreign_files(tmp_path, meta, where):
    """--overwrite never deletes the checkpoint being converted, nor a file it did not write."""
    src = shutil.copytree(meta, tmp_path / "models" / "meta")
    out = {"input": src, "parent": tmp_path / "models", "foreign": tmp_path / "out"}[where]
    if where == "foreign":
        out.mkdir()
        (out / ".metadata").write_bytes(b"")
        (out / "notes.txt").write_text("precious")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_convert(src, out, "--overwrite", nproc=1)
    if where == "foreign":
        assert_clean_error(result, f"--save_checkpoint_dir {out}: holds notes.txt, which convert_checkpoints.py "
                                   "did not write")
    else:
        assert_clean_error(result, f"--save_checkpoint_dir {out}: holds the input {src}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def run_generate(ckpt, *extra, nproc=2):
    return run_script("generate.py", "--converted_ckpt_dir", ckpt, "--max_gen_len", "4", *extra, nproc=nproc)


def test_not_a_dcp_checkpoint(tmp_path, converted):
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(converted / "model_args.json", fake)
    shutil.copy(converted / "tokenizer.model", fake)
    assert_clean_error(run_generate(fake, "--prompt", "hi"), "--converted_ckpt_dir", "not a DCP checkpoint")


class RunsCode:
    """Unpickled, it runs a shell command (what plain pickle.load does with such a .metadata)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_metadata_that_would_run_code(tmp_path, converted):
    bad = shutil.copytree(converted, tmp_path / "bad")
    marker = tmp_path / "ran"
    (bad / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    result = run_generate(bad, "--prompt", "hi")
    assert_clean_error(result, f"{bad / '.metadata'}: not the metadata of a converted checkpoint",
                       "posix.system is not part of a DCP checkpoint's metadata")
    assert not marker.exists()


def test_metadata_naming_files_outside_the_folder(tmp_path, converted):
    from llama.checkpoint import read_metadata
    from llama.errors import UserError

    bad = shutil.copytree(converted, tmp_path / "bad")
    metadata = read_metadata(bad)
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match=r"\.metadata: not the metadata of a converted checkpoint \(it stores data "
                                        "outside the checkpoint's folder"):
        read_metadata(bad)


def test_checkpoint_of_another_model(tmp_path, converted):
    args = json.loads((converted / "model_args.json").read_text())
    args.update(dim=128)
    (tmp_path / "other.json").write_text(json.dumps(args))
    result = run_generate(converted, "--prompt", "hi", "--model_args", tmp_path / "other.json")
    assert_clean_error(result, "converted from another model", "other.json")


def test_tp_degree_must_divide_heads(converted):
    assert_clean_error(run_generate(converted, "--prompt", "hi", nproc=3), "tensor-parallel degree 3",
                       "n_heads 4")


def test_prompt_longer_than_max_seq_len(converted):
    result = run_generate(converted, "--prompt", "Four score and seven years ago", "--max_seq_len", "8")
    assert_clean_error(result, "prompt 0", "max_seq_len 8")


def test_empty_prompt(converted):
    assert_clean_error(run_generate(converted, "--prompt", "Four", "--prompt", " "), "prompt 1 is empty")


@pytest.mark.parametrize("flags,message", [
    (("--max_gen_len", "0"), "--max_gen_len 0"),
    (("--temperature", "-1"), "--temperature -1.0"),
    (("--top_p", "1.5"), "--top_p 1.5"),
    (("--max_batch_size", "0"), "--max_batch_size 0"),
])
def test_out_of_range_flags(converted, flags, message):
    assert_clean_error(run_generate(converted, "--prompt", "hi", *flags), message)


def test_prompt_file_not_json(tmp_path, converted):
    (tmp_path / "prompts.json").write_text("[\"unterminated")
    result = run_generate(converted, "--prompt_file", tmp_path / "prompts.json")
    assert_clean_error(result, "--prompt_file", "not valid JSON")
