"""TP=k against TP=1 on real gloo process groups, and conversion at any world size."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import LLAMA2_TINY, LLAMA3_TINY, convert, generate_json, make_meta_checkpoint, random_weights, run_script
from llama.args import ModelArgs


def tp_logits(ckpt, out, nproc):
    result = run_script("tests/tp_logits.py", ckpt, out, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return torch.load(out)


@pytest.mark.parametrize("arch,layout,degrees", [
    (LLAMA2_TINY, "llama2", (2, 4)),
    (LLAMA3_TINY, "llama3", (2, 4)),  # 2 KV heads: at TP=4 each is held by 2 ranks
], ids=["llama2", "llama3"])
def test_tp_logits_equal_tp1(tmp_path, small_sp_tokenizer, arch, layout, degrees):
    make_meta_checkpoint(tmp_path / "meta", small_sp_tokenizer, n_shards=2, llama2_layout=layout == "llama2", **arch)
    convert(tmp_path / "meta", tmp_path / "dcp", 2)
    reference = tp_logits(tmp_path / "dcp", tmp_path / "tp1.pt", 1)
    assert reference.shape == (2, 16, 256) and reference.std() > 1.0
    for k in degrees:
        torch.testing.assert_close(tp_logits(tmp_path / "dcp", tmp_path / f"tp{k}.pt", k), reference,
                                   rtol=1e-5, atol=1e-5)


def stored_weights(ckpt_dir) -> dict[str, torch.Tensor]:
    """Read a DCP checkpoint whole, in this single process."""
    metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()}
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    return state


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP says so even with no_dist=True
@pytest.mark.parametrize("layout", ["llama2", "llama3-tied"])
def test_convert_any_world_size_same_weights_and_tokens(tmp_path, small_sp_tokenizer, layout):
    """2 Meta shards converted on 1 and on 2 ranks, then served at TP=1 and TP=2."""
    arch = LLAMA2_TINY if layout == "llama2" else LLAMA3_TINY
    args = make_meta_checkpoint(tmp_path / "meta", small_sp_tokenizer, n_shards=2, llama2_layout=layout == "llama2",
                                tied_output=layout == "llama3-tied", **arch)
    expected = random_weights(args)
    if layout == "llama3-tied":
        expected["output.weight"] = expected["tok_embeddings.weight"]
    prompts = ("Four score and seven", "It is for us the living")
    outputs = []
    for n in (1, 2):
        out = tmp_path / f"dcp{n}"
        convert(tmp_path / "meta", out, n)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []
        stored = stored_weights(out)
        assert stored.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(stored[name], tensor), name
        assert ModelArgs.load(out / "model_args.json").vocab_size == 256
        for k in (1, 2):
            results = generate_json(out, tmp_path / f"out{n}{k}.json", *prompts, nproc=k, extra=("--max_gen_len", "8"))
            outputs.append([r["tokens"] for r in results["results"]])
    assert all(len(tokens) == 8 for tokens in outputs[0])
    assert outputs == [outputs[0]] * 4
