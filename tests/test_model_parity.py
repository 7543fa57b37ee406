"""The model against an independent implementation: transformers' LlamaForCausalLM, given the
same weights through the mapping the benchmark's baseline uses."""

import pytest
import torch
from transformers import LlamaForCausalLM

from helpers import LLAMA2_TINY, LLAMA3_TINY, paged_logits, random_weights
from llama.args import ModelArgs
from llama.benchmarking import hf_config, hf_state_dict
from llama.model import Transformer


def hf_model(args: ModelArgs, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf_config(args, torch.float32)).eval()
    model.load_state_dict(hf_state_dict(state, args), strict=True)
    return model


def our_model(args: ModelArgs, state: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(args).eval()
    model.load_state_dict(state, strict=True)
    return model


def random_case(arch: dict, seed: int, batch: int, length: int) -> tuple[ModelArgs, dict, torch.Tensor]:
    """Model args, random weights and random token ids for one comparison."""
    args = ModelArgs(**arch, vocab_size=300)
    tokens = torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return args, random_weights(args, seed=seed), tokens


BOTH_FAMILIES = pytest.mark.parametrize("arch", [LLAMA2_TINY, LLAMA3_TINY], ids=["llama2", "llama3.1"])


@BOTH_FAMILIES
def test_logits_match_transformers(arch):
    args, state, tokens = random_case(arch, seed=1, batch=2, length=40)
    with torch.no_grad():
        expected = hf_model(args, state)(tokens).logits
        ours = our_model(args, state)(tokens, all_logits=True)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1.0, "random weights this flat would hide a mismatch"


@BOTH_FAMILIES
def test_cached_decode_matches_full_forward(arch):
    """Prefill then one token at a time through the paged KV cache = one pass over the whole sequence."""
    args, state, tokens = random_case(arch, seed=2, batch=3, length=24)
    with torch.no_grad():
        model = our_model(args, state)
        full = model(tokens, all_logits=True)
        cached = paged_logits(model, tokens, prefill=15)  # decode crosses block boundaries (4 tokens)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_scaled_rope_changes_long_range_frequencies_only():
    from llama.model import rope_frequencies

    args = ModelArgs(**LLAMA3_TINY, vocab_size=300)
    plain = rope_frequencies(ModelArgs(**{**LLAMA3_TINY, "use_scaled_rope": False}, vocab_size=300))
    scaled = rope_frequencies(args)
    assert torch.equal(scaled[:, 0], plain[:, 0])  # the fastest rotation is untouched
    torch.testing.assert_close(scaled[:, -1], plain[:, -1] / args.rope_scaling_factor)
