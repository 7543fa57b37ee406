"""Weight-only int8/int4 quantization: the kernels against dequantize-then-F.linear, the stored
checkpoint at every conversion world size and TP degree, the demo model's quality, bad input."""

import gc
import itertools
import json
import os
import re
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from helpers import LLAMA3_TINY, REPO, convert, make_meta_checkpoint, run_script
from llama import cpu_linear, quantize
from llama.args import ModelArgs
from llama.checkpoint import check_dcp_matches
from llama.errors import UserError

# dim 128 and FFN 384 split into whole groups of 32 at TP = 4; 2 KV heads, so TP = 4 holds each
# KV head on 2 ranks; 40 % 16 != 0 rows exercises the CPU int4 packing's padding.
ARCH = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=128, max_seq_len=64, max_batch_size=2)
INT4 = ("--quantize", "int4", "--group_size", "32")


@pytest.mark.parametrize("scheme", [quantize.Scheme("int8"), quantize.Scheme("int4", 32), quantize.Scheme("int4", 128)],
                         ids=["int8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_dequantize_then_linear(scheme, dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 256, generator=g) * 0.05
    stored = quantize.quantize(weight, scheme, dtype)
    dequantized = quantize.dequantize(stored["weight"], stored["scales"], stored.get("zeros"))
    # Rounding error at most half a step: a row's scale (int8) or the group's (int4).
    step = stored["scales"].float().repeat_interleave(1 if scheme.name == "int8" else scheme.group_size, dim=-1)
    assert ((weight - dequantized).abs() <= step.view(40, -1) / 2 * 1.01 + 1e-6).all()
    # A scale depends only on its own row: quantizing a part of the rows gives the same bytes.
    part = quantize.quantize(weight[8:24], scheme, dtype)
    assert all(torch.equal(part[k], stored[k][8:24]) for k in stored)

    operands = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"), dtype)
    compiled = torch.compile(lambda x: quantize.linear(x, scheme, 40, *operands), fullgraph=True)
    for rows in (1, 5, 14):  # a decode step, batched decode, prefill (42 rows: the CPU's blocked GEMM)
        x = torch.randn(rows, 3, 256, generator=g).to(dtype)
        out = quantize.linear(x, scheme, 40, *operands)
        expected = F.linear(x.float(), dequantized)
        assert out.shape == (rows, 3, 40) and out.dtype == dtype
        if scheme.name == "int4" and cpu_linear.has_quantized_kernels():
            # cpu_linear.c's int4 kernel and its GEMM fallback round the activations to 8 bits per
            # group: an error under a tenth of the one the weights' own rounding makes (measured
            # 7-9%), and the same in every path (the group's own, whatever the split or batch).
            own_rounding = F.linear(x.float(), dequantized - weight)
            assert (out.float() - expected).norm() <= 0.15 * own_rounding.norm()
            rounded = cpu_linear.round_int4_activations(x.float().view(-1, 256), scheme.group_size)
            tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-5
            torch.testing.assert_close(out.float(), F.linear(rounded, dequantized).view(rows, 3, 40),
                                       rtol=tolerance, atol=tolerance)
        else:
            # float32: the CPU int8 kernel rounds activations to 16-bit integers, an error
            # hundreds of times below the weights' own rounding (half a step: ~1e-2 here).
            tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-4
            torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
        if rows == 1:  # the decode step's product, as a compiled graph calls it
            assert torch.equal(compiled(x), out)


def test_torch_kernels_where_no_c_compiler_is_found():
    """Without a C compiler (CC fails), CPUs run torch's own int8/int4 kernels, on their own
    packed layouts: the same checks as above, in a process of its own."""
    if not cpu_linear.has_quantized_kernels():
        pytest.skip("this machine already runs torch's kernels (the test above)")
    test = f"{__file__}::test_kernels_match_dequantize_then_linear"
    probe = "from llama import cpu_linear; assert not cpu_linear.has_quantized_kernels()"
    env = {**os.environ, "CC": "false"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO).returncode == 0
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env, cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "6 passed" in result.stdout, result.stdout[-2000:]


def stored_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()}
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    return state


def probe(out, dtype, *ckpts, nproc=1, flags=("--weights",)) -> dict:
    result = run_script("tests/quant_probe.py", out, dtype, *flags, *ckpts, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return torch.load(out)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_any_conversion_world_size_and_tp_degree(tmp_path, small_sp_tokenizer):
    """From 2 Meta shards, int4 converted on 1 and 2 ranks (the same bytes) and int8 on 2,
    each loaded at TP = 1, 2, 4: the same dequantized weights, the same greedy tokens and their
    log-probabilities within float32 sums' error (TP = 4 splits wo and w2 into rows of 32 and
    96 inputs, which cpu_linear.c's int4 kernel does not take: a GEMM multiplies them)."""
    make_meta_checkpoint(tmp_path / "meta", small_sp_tokenizer, n_shards=2, llama2_layout=False, **ARCH)
    ckpts = {("int4", n): tmp_path / f"int4-n{n}" for n in (1, 2)} | {("int8", 2): tmp_path / "int8-n2"}
    for (scheme, n), ckpt in ckpts.items():
        convert(tmp_path / "meta", ckpt, n, *(INT4 if scheme == "int4" else ("--quantize", "int8")))
    one, two = (stored_tensors(ckpts["int4", n]) for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    for scheme in ("int8", "int4"):
        one = stored_tensors(ckpts[scheme, 2])
        assert json.loads((ckpts[scheme, 2] / "model_args.json").read_text())["quantize"] == scheme
        if scheme == "int4":
            assert one["output.weight"].dtype == torch.uint8 and one["output.zeros"].shape == (256, 4)
        assert one["tok_embeddings.weight"].dtype == torch.float32  # the embedding is not quantized
        # model_args.json edited to say the weights are plain floats: refused before loading anything.
        edited = ModelArgs.load(ckpts[scheme, 2] / "model_args.json")
        edited.quantize, edited.group_size, edited.dtype = None, None, "bfloat16"
        described = "int8" if scheme == "int8" else "int4 (group size 32)"
        with pytest.raises(UserError, match=rf"holds {re.escape(described)}-quantized weights but EDITED says "
                                            r'unquantized; restore its "quantize" and "group_size"'):
            check_dcp_matches(ckpts[scheme, 2], edited, "EDITED")

    runs = {k: probe(tmp_path / f"tp{k}.pt", "float32", *ckpts.values(), nproc=k) for k in (1, 2, 4)}
    for scheme in ("int8", "int4"):
        stored = stored_tensors(ckpts[scheme, 2])
        reference = runs[1][str(ckpts[scheme, 2])]
        assert len(reference["weights"]) == 2 * 7 + 1 and all(len(t) == 12 for t in reference["tokens"])
        wq = reference["weights"]["layers.0.attention.wq"]
        expected = quantize.dequantize(stored["layers.0.attention.wq.weight"], stored["layers.0.attention.wq.scales"],
                                       stored.get("layers.0.attention.wq.zeros"))
        assert torch.equal(wq, expected)
        for (_, n), k in itertools.product((key for key in ckpts if key[0] == scheme), (1, 2, 4)):
            got = runs[k][str(ckpts[scheme, n])]
            assert got["tokens"] == reference["tokens"], (scheme, n, k)
            # int4: float sums' error (measured 2e-6). int8: cpu_linear.c rounds activations to 16
            # bits per 32 columns, the same at every TP degree (tests/test_cpu_linear.py), but the
            # all-reduce's order moves its inputs by an ulp, which flips some roundings: a step of
            # 3e-5 of a block's largest value each (measured 4.4e-5 at TP 2, 8.4e-5 with one
            # scale per rank's part of a row; forced through float32 GEMMs instead, 1.5e-6).
            torch.testing.assert_close(got["logprobs"], reference["logprobs"], rtol=0,
                                       atol=1e-5 if scheme == "int4" else 2e-4,
                                       msg=lambda m: f"{scheme} converted on {n}, TP {k}: {m}")
            for name, tensor in reference["weights"].items():
                assert torch.equal(got["weights"][name], tensor), (scheme, n, k, name)


def test_demo_quality_int8_and_int4(tmp_path, demo_build):
    """The demo model (built once into the tests' demo cache, as generate.py --demo does)
    against its own text, all computed in bfloat16: the reference is the demo's own float32
    conversion."""
    meta, reference = demo_build[0] / "demo" / "meta", demo_build[0] / "demo" / "dcp"
    for name, flags in (("int8", ("--quantize", "int8")), ("int4", INT4)):
        convert(meta, tmp_path / name, 1, *flags)
    ppl = probe(tmp_path / "ppl.pt", "bfloat16", reference, tmp_path / "int8", tmp_path / "int4",
                flags=("--perplexity",))
    ref, int8, int4 = (ppl[str(path)] for path in (reference, tmp_path / "int8", tmp_path / "int4"))
    print(f"demo perplexity (bf16 compute): reference {ref['perplexity']:.4f}, int8 {int8['perplexity']:.4f}, "
          f"int4 g32 {int4['perplexity']:.4f}")
    assert ref["perplexity"] < 1.5  # the demo has learned its text
    assert int8["perplexity"] <= 1.01 * ref["perplexity"]
    assert int4["perplexity"] <= 1.05 * ref["perplexity"]
    assert int8["tokens"] == ref["tokens"]


def test_bad_input(tmp_path, small_sp_tokenizer):
    make_meta_checkpoint(tmp_path / "meta", small_sp_tokenizer, **ARCH)
    result = run_script("convert_checkpoints.py", "--original_ckpt_dir", tmp_path / "meta", "--save_checkpoint_dir",
                        tmp_path / "out", "--quantize", "int3")
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        "error: --quantize int3: unknown quantization; choose int8 or int4"]

    args = ModelArgs(**ARCH, vocab_size=256)  # dim 128, FFN 384
    with pytest.raises(UserError, match=r"^--group_size 256 does not divide the input width 128 of "
                                        r"attention.wq/wk/wv, feed_forward.w1/w3, output; use 32 or 64 or 128$"):
        quantize.check_group_size(args, 256, "--group_size")
    with pytest.raises(UserError, match=r"^--group_size 100: int4 group sizes are 32, 64, 128, 256$"):
        quantize.check_scheme("int4", 100)
    with pytest.raises(UserError, match=r"^--group_size 64: a group size applies to int4 quantization only$"):
        quantize.check_scheme("int8", 64)
    args.quantize, args.group_size = "int4", 128
    with pytest.raises(UserError, match=r"^tensor-parallel degree 2 leaves 64 inputs of attention.wo per rank, not "
                                        r"a multiple of the checkpoint's int4 group size 128; re-convert with "
                                        r"--group_size 64$"):
        quantize.check_tp_degree(args, 2)
    with pytest.raises(UserError, match="degree 8 .* no int4 group size fits this degree: use fewer ranks, or int8"):
        quantize.check_tp_degree(args, 8)
    with pytest.raises(UserError, match="CUDA int4 kernel takes bfloat16 only; use --dtype bfloat16"):
        quantize.check_dtype(quantize.scheme_of(args), torch.float16, torch.device("cuda"))
    quantize.check_dtype(quantize.scheme_of(args), torch.float16, torch.device("cpu"))  # CPU kernels take any

    edited = tmp_path / "model_args.json"
    args.save(edited)
    edited.write_text(edited.read_text().replace('"int4"', '"int3"'))
    with pytest.raises(UserError, match=r'model_args.json: "quantize" int3: unknown quantization; choose int8, int4, fp8 or int4_eo8$'):
        quantize.check_args(ModelArgs.load(edited), str(edited))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_random_quantized_model_and_its_roofline_bytes(scheme):
    """benchmark.py --random_weights --quantize: the model it builds decodes, and the roofline
    counts the bytes its kernels read (packed values, scales, zeros), not bf16 bytes."""
    from llama import benchmarking as bench
    from llama.distributed import init_runtime
    from llama.model import PagedBatch

    args = ModelArgs(**LLAMA3_TINY, vocab_size=256, quantize=scheme, group_size=32 if scheme == "int4" else None)
    runtime = init_runtime()
    try:
        model = bench.build_random_model(args, runtime, torch.bfloat16)
        model.setup_kv_cache(3, 16)
        with torch.inference_mode():
            batch = PagedBatch(torch.zeros(3, dtype=torch.long), torch.tensor([0, 16, 32]), torch.arange(3)[:, None])
            logits = model.decode(torch.tensor([1, 2, 3]), batch)
        assert logits.shape == (3, 256) and logits.isfinite().all() and logits.std() > 0
        block = model.layers[0]  # the projections that share an input are one product
        assert isinstance(block.attention.wqkv, quantize.FusedLinear) and not hasattr(block.attention, "wq")
        assert block.feed_forward.w13.local_out_features == 2 * args.ffn_hidden_dim
        embedding = model.tok_embeddings.weight.to_local()
        cache = bench.kv_cache_bytes(args, 1, 3, args.max_seq_len, 2)
        read = bench.weight_bytes(model) - embedding.numel() * 2 + 3 * args.dim * 2 + cache
        assert bench.decode_bytes_per_step(args, 1, 3, args.max_seq_len, 2) == read
        assert model.output.weight.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
        linears = read - cache - 3 * args.dim * 2
        unquantized = bench.decode_bytes_per_step(ModelArgs(**LLAMA3_TINY, vocab_size=256), 1, 3, 0, 2) - 3 * args.dim * 2
        assert linears < unquantized * (0.6 if scheme == "int8" else 0.35)
    finally:
        torch.distributed.destroy_process_group()


def test_fusing_frees_the_fused_parts_at_once():
    """pack_for_device fuses wq/wk/wv and w1/w3: their stored shards go as each fusion is made
    (the modules themselves wait for the cycle collector; their tensors must not, or a rank
    briefly holds those weights twice: +0.33 GB of int4 llama3.2-1b)."""
    from llama.distributed import init_runtime
    from llama.parallel import build_sharded

    args = ModelArgs(**LLAMA3_TINY, vocab_size=256, quantize="int8")
    runtime = init_runtime()
    gc.disable()
    try:
        model = build_sharded(args, runtime.mesh, runtime.device, torch.float32)
        parts = [weakref.ref(getattr(module, name).weight) for module, name in
                 ((model.layers[0].attention, "wq"), (model.layers[1].feed_forward, "w3"))]
        quantize.pack_for_device(model)
        assert [part() for part in parts] == [None, None]
    finally:
        gc.enable()
        torch.distributed.destroy_process_group()
