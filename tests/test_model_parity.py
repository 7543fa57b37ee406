"""The model against an independent implementation: transformers' LlamaForCausalLM."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import LLAMA2_TINY, LLAMA3_TINY, random_weights
from llama.args import ModelArgs
from llama.model import Transformer


def hf_model(args: ModelArgs, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope |= {"rope_type": "llama3", "factor": args.rope_scaling_factor, "low_freq_factor": 1.0,
                 "high_freq_factor": args.rope_high_freq_factor, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_parameters=rope,
                         max_position_embeddings=131072, tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()

    def to_half_rotation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        # Meta rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves (x0,x_{d/2})...
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    hf_state = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
                "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf_state |= {
            q + "self_attn.q_proj.weight": to_half_rotation(state[p + "attention.wq.weight"], args.n_heads),
            q + "self_attn.k_proj.weight": to_half_rotation(state[p + "attention.wk.weight"], args.n_kv_heads),
            q + "self_attn.v_proj.weight": state[p + "attention.wv.weight"],
            q + "self_attn.o_proj.weight": state[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": state[p + "feed_forward.w1.weight"],
            q + "mlp.up_proj.weight": state[p + "feed_forward.w3.weight"],
            q + "mlp.down_proj.weight": state[p + "feed_forward.w2.weight"],
            q + "input_layernorm.weight": state[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
        }
    model.load_state_dict(hf_state, strict=True)
    return model


def our_model(args: ModelArgs, state: dict[str, torch.Tensor], batch: int) -> Transformer:
    model = Transformer(args).eval()
    model.load_state_dict(state, strict=True)
    model.setup_caches(batch, args.max_seq_len)
    return model


@pytest.mark.parametrize("arch", [LLAMA2_TINY, LLAMA3_TINY], ids=["llama2", "llama3.1"])
def test_logits_match_transformers(arch):
    args = ModelArgs(**arch, vocab_size=300)
    state = random_weights(args, seed=1)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(args, state)(tokens).logits
        ours = our_model(args, state, 2)(tokens, torch.arange(40), all_logits=True)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1.0, "random weights this flat would hide a mismatch"


@pytest.mark.parametrize("arch", [LLAMA2_TINY, LLAMA3_TINY], ids=["llama2", "llama3.1"])
def test_cached_decode_matches_full_forward(arch):
    """Prefill then one token at a time through the KV cache = one pass over the whole sequence."""
    args = ModelArgs(**arch, vocab_size=300)
    state = random_weights(args, seed=2)
    tokens = torch.randint(0, args.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = our_model(args, state, 3)(tokens, torch.arange(24), all_logits=True)
        model = our_model(args, state, 3)
        steps = [model(tokens[:, :16], torch.arange(16), all_logits=True)]
        steps += [model(tokens[:, i:i + 1], torch.arange(i, i + 1)) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_scaled_rope_changes_long_range_frequencies_only():
    from llama.model import rope_frequencies

    args = ModelArgs(**LLAMA3_TINY, vocab_size=300)
    plain = rope_frequencies(ModelArgs(**{**LLAMA3_TINY, "use_scaled_rope": False}, vocab_size=300))
    scaled = rope_frequencies(args)
    assert torch.equal(scaled[:, 0], plain[:, 0])  # the fastest rotation is untouched
    torch.testing.assert_close(scaled[:, -1], plain[:, -1] / args.rope_scaling_factor)
