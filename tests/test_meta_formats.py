"""Meta's other checkpoint formats (Llama 3.1 405B FP8 and MP16, Llama 3.2 INT4_EO8) as faithful
miniatures built by tests/make_meta_checkpoint.py with Meta's own rules: converted at several
world sizes, run at several TP degrees, against references computed here from the same files."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import LLAMA3_TINY, REPO, convert, make_meta_checkpoint, random_weights, run_script
from llama.args import ModelArgs
from llama.meta_format import FP8_SCALES_FILE, save_meta_checkpoint
from make_meta_checkpoint import (edit_params, fp8_dequantized_state, kv_heads_duplicated, shard_paths, to_fp8,
                                  write_int4_eo8)
from test_errors import assert_clean_error

# Four layers: the two inner ones carry FP8 feed-forward weights, as in 405B (all but the
# first and the last); FFN hidden size 224 splits into whole rows over 1, 2 and 4 ranks.
ARCH = {**LLAMA3_TINY, "n_layers": 4, "max_seq_len": 64, "max_batch_size": 2}

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def stored_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()}
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    return state


def probe(out, *ckpts, nproc=1) -> dict:
    """Greedy tokens of the demo prompts and the first prompt's logits, each checkpoint at TP = nproc."""
    result = run_script("tests/quant_probe.py", out, "float32", "--logits", *ckpts, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return torch.load(out)


def run_convert(src, out, *extra, nproc=2):
    return run_script("convert_checkpoints.py", "--original_ckpt_dir", src, "--save_checkpoint_dir", out, *extra,
                      nproc=nproc)


def save_reference(state: dict[str, torch.Tensor], args: ModelArgs, meta_dir, tokenizer) -> None:
    """`state` (whole weights) as a one-shard float32 Meta checkpoint."""
    save_meta_checkpoint({k: v for k, v in state.items() if k != "rope.freqs"}, args, meta_dir, llama2_layout=False)
    shutil.copyfile(tokenizer, meta_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def fp8_meta(tmp_path_factory, small_sp_tokenizer):
    """A Llama 3.1 405B FP8 download in miniature: 2 shards, fp8_scales_0.pt and fp8_scales_1.pt."""
    path = tmp_path_factory.mktemp("fp8") / "meta"
    args = make_meta_checkpoint(path, small_sp_tokenizer, n_shards=2, llama2_layout=False, **ARCH)
    to_fp8(path, args.n_layers)
    return path


@pytest.fixture(scope="module")
def fp8_reference(tmp_path_factory, fp8_meta, small_sp_tokenizer):
    """The model the FP8 miniature stands for, dequantized here by Meta's rule in float32 and
    converted like any one-shard float32 checkpoint."""
    path = tmp_path_factory.mktemp("fp8-reference")
    dequantized = fp8_dequantized_state(fp8_meta)
    save_reference(dequantized, ModelArgs(**ARCH, vocab_size=dequantized["output.weight"].shape[0]),
                   path / "meta", small_sp_tokenizer)
    convert(path / "meta", path / "dcp")
    return path / "dcp"


def test_model_args_need_no_quantization_module():
    """llama.args and llama.quantize import each other no more: the scheme belongs to quantize."""
    probe_code = "import sys, llama.args; assert 'llama.quantize' not in sys.modules, 'llama.args imports llama.quantize'"
    assert subprocess.run([sys.executable, "-c", probe_code], cwd=REPO).returncode == 0


def test_fp8_dequantized_at_any_world_size_and_tp(tmp_path, fp8_meta, fp8_reference):
    """FP8 -> DCP on 1, 2 and 4 ranks holds exactly the weights dequantized here by Meta's rule
    (float32; bfloat16 rounds that product once), and runs at TP 1, 2 and 4 like the model
    built from those weights."""
    shard = torch.load(shard_paths(fp8_meta)[1], weights_only=True, mmap=True)
    assert shard["layers.1.feed_forward.w2.weight"].dtype == torch.float8_e4m3fn
    assert shard["layers.0.feed_forward.w2.weight"].dtype == torch.float32  # first and last layer stay
    reference = stored_tensors(fp8_reference)
    for n, dtype in ((1, "float32"), (2, "float32"), (4, "bfloat16")):
        out = convert(fp8_meta, tmp_path / f"fp8-n{n}", n, "--dtype", dtype)
        assert "FP8 feed-forward weights with row-wise scales" in out.stdout
        got = stored_tensors(tmp_path / f"fp8-n{n}")
        assert got.keys() == reference.keys(), n
        assert all(torch.equal(got[k], reference[k].to(got[k].dtype)) for k in got), n

    runs = {k: probe(tmp_path / f"tp{k}.pt", tmp_path / "fp8-n2", fp8_reference, nproc=k) for k in (1, 2, 4)}
    expected = runs[1][str(fp8_reference)]
    for k, run in runs.items():
        got = run[str(tmp_path / "fp8-n2")]
        assert got["tokens"] == expected["tokens"], k
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-4, atol=1e-4)


def test_fp8_kept_at_any_world_size_and_tp(tmp_path, fp8_meta, fp8_reference):
    """--keep_fp8 on 1 and 4 ranks: w1/w3 rows keep their fp8 values and their shard's scales
    (the same bytes from either world size), w2 is requantized per whole row (within half an
    fp8 step of Meta's dequantized row); loaded at TP 1, 2 and 4 (dequantized on CPU) it gives
    the dequantized model's greedy tokens."""
    for n in (1, 4):
        convert(fp8_meta, tmp_path / f"kept-n{n}", n, "--keep_fp8")
    one, four = stored_tensors(tmp_path / "kept-n1"), stored_tensors(tmp_path / "kept-n4")
    assert one.keys() == four.keys() and all(torch.equal(one[k], four[k]) for k in one)
    reference = stored_tensors(fp8_reference)
    shards = [torch.load(p, weights_only=True) for p in shard_paths(fp8_meta)]
    scales = [torch.load(fp8_meta / FP8_SCALES_FILE.format(i), weights_only=True) for i in range(len(shards))]
    assert torch.equal(one["layers.1.feed_forward.w1.weight"].view(torch.uint8),
                       torch.cat([s["layers.1.feed_forward.w1.weight"] for s in shards]).view(torch.uint8))
    assert torch.equal(one["layers.1.feed_forward.w1.scales"],
                       torch.cat([scales[i][f"1_feed_forward.w1_{i}"] for i in range(len(shards))]))
    w2 = one["layers.2.feed_forward.w2.weight"].float() * one["layers.2.feed_forward.w2.scales"][:, None]
    half_step = reference["layers.2.feed_forward.w2.weight"].abs() / 16 + one["layers.2.feed_forward.w2.scales"][:, None] / 2 ** 9
    assert ((w2 - reference["layers.2.feed_forward.w2.weight"]).abs() <= half_step).all()
    assert one["layers.0.feed_forward.w2.weight"].dtype == torch.float32 and "layers.0.feed_forward.w2.scales" not in one
    assert '"quantize": "fp8"' in (tmp_path / "kept-n4" / "model_args.json").read_text()

    runs = {k: probe(tmp_path / f"tp{k}.pt", tmp_path / "kept-n4", *([fp8_reference] if k == 1 else []), nproc=k)
            for k in (1, 2, 4)}
    expected = runs[1][str(fp8_reference)]
    for k, run in runs.items():
        got = run[str(tmp_path / "kept-n4")]
        assert got["tokens"] == expected["tokens"], k
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=0.05, atol=0.05)


def test_mp16_duplicated_kv_heads(tmp_path, small_sp_tokenizer):
    """405B MP16's layout in miniature: 2 KV heads each stored twice over 4 shards, params.json
    saying 4. Converted on 1, 2 and 4 ranks it is the same DCP as the model saved with its 2
    heads on 2 shards (MP8's layout), and runs at TP 4 (more ranks than KV heads)."""
    args = ModelArgs(**ARCH, vocab_size=256)
    state = random_weights(args)
    save_meta_checkpoint(state, args, tmp_path / "mp2", n_shards=2, llama2_layout=False)
    duplicated, mp16_args = kv_heads_duplicated(state, args, 2)
    save_meta_checkpoint(duplicated, mp16_args, tmp_path / "mp4", n_shards=4, llama2_layout=False)
    for name in ("mp2", "mp4"):
        shutil.copyfile(small_sp_tokenizer, tmp_path / name / "tokenizer.model")
    convert(tmp_path / "mp2", tmp_path / "ref")
    reference = stored_tensors(tmp_path / "ref")
    for n in (1, 2, 4):
        out = convert(tmp_path / "mp4", tmp_path / f"mp4-n{n}", n)
        assert "each KV head duplicated 2x" in out.stdout
        got = stored_tensors(tmp_path / f"mp4-n{n}")
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), n
    assert (tmp_path / "mp4-n2" / "model_args.json").read_text() == (tmp_path / "ref" / "model_args.json").read_text()
    run = probe(tmp_path / "tp4.pt", tmp_path / "mp4-n2", tmp_path / "ref", nproc=4)
    assert run[str(tmp_path / "mp4-n2")]["tokens"] == run[str(tmp_path / "ref")]["tokens"]

    # One copy of one head differs (a later layer's wv): one clear line, nothing written.
    bad = torch.load(tmp_path / "mp4" / "consolidated.03.pth", weights_only=True)
    bad["layers.2.attention.wv.weight"][0, 0] += 1
    torch.save(bad, tmp_path / "mp4" / "consolidated.03.pth")
    assert_clean_error(run_convert(tmp_path / "mp4", tmp_path / "out"), "consolidated.03.pth",
                       "layers.2.attention.wv.weight should duplicate the KV head in consolidated.02.pth")
    assert not any(tmp_path.glob("out*"))


def test_fp8_bad_input(tmp_path, fp8_meta):
    """A missing fp8_scales file, scales of the wrong shape, a shard missing: one line, nothing
    written (every rank checks these alike, so one rank shows it)."""
    def copy(name):
        shutil.copytree(fp8_meta, tmp_path / name)
        return tmp_path / name

    src = copy("no-scales")
    (src / FP8_SCALES_FILE.format(1)).unlink()
    assert_clean_error(run_convert(src, tmp_path / "out", nproc=1), "fp8_scales_1.pt: missing", "consolidated.01.pth")
    src = copy("bad-shape")
    scales = torch.load(src / FP8_SCALES_FILE.format(0), weights_only=True)
    scales["2_feed_forward.w2_0"] = scales["2_feed_forward.w2_0"][:-1]
    torch.save(scales, src / FP8_SCALES_FILE.format(0))
    assert_clean_error(run_convert(src, tmp_path / "out", nproc=1), "fp8_scales_0.pt", '"2_feed_forward.w2_0" has shape [63]',
                       "has 64 rows")
    src = copy("bf16")  # --keep_fp8 on a checkpoint with no FP8
    for path in shard_paths(src):
        torch.save({k: v.float() for k, v in torch.load(path, weights_only=True).items()}, path)
    assert_clean_error(run_convert(src, tmp_path / "out", "--keep_fp8", nproc=1), "--keep_fp8", "holds no FP8 weights")
    src = copy("one-shard")
    (src / "consolidated.01.pth").unlink()
    (src / FP8_SCALES_FILE.format(1)).unlink()
    assert_clean_error(run_convert(src, tmp_path / "out", nproc=1), "in each of 1 shard(s)", "does not add up")
    assert not any(tmp_path.glob("out*"))


# Llama 3.2 1B's proportions (FFN hidden size a power of two, as SpinQuant's rotation needs):
# dim 128, hidden 512; int4 groups of 32 stay whole on each of 4 ranks.
EO8_ARCH = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=1.5,
                norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=64, max_batch_size=2)


def test_hadamard_is_sylvesters_matrix():
    from llama.quantize import hadamard

    matrix = torch.ones(1, 1)
    for _ in range(4):
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), matrix)
    x = torch.randn(3, 16)
    torch.testing.assert_close(hadamard(x), x @ matrix / 4)


@pytest.mark.parametrize("variant", ["qlora", "spinquant"])
def test_int4_eo8(tmp_path, small_sp_tokenizer, variant):
    """Llama 3.2 INT4_EO8 in miniature (QLoRA: LoRA rank 4, scale 2; SpinQuant: w2's input
    rotated): converted on 1 and 2 ranks (the same bytes), run at TP 1, 2 and 4 through the int4
    kernels, against the float32 model the files stand for (weights dequantized by Meta's rule,
    LoRA added, rotation applied). The kernels round activations to 8 bits per group of inputs
    where Meta's reference rounds them per token: the logits stay within 1% (relative norm;
    measured 0.34% QLoRA, 0.18% SpinQuant, the same at every TP degree)."""
    args = ModelArgs(**EO8_ARCH, vocab_size=256)
    lora = (4, 2.0) if variant == "qlora" else None
    reference = write_int4_eo8(random_weights(args), args, tmp_path / "meta", 32, lora=lora,
                               spinquant=variant == "spinquant")
    shutil.copyfile(small_sp_tokenizer, tmp_path / "meta" / "tokenizer.model")
    save_reference(reference, args, tmp_path / "ref-meta", small_sp_tokenizer)
    convert(tmp_path / "ref-meta", tmp_path / "ref")
    sizes = (1, 2) if variant == "qlora" else (2,)
    for n in sizes:
        out = convert(tmp_path / "meta", tmp_path / f"eo8-n{n}", n)
        assert "Meta's INT4_EO8" in out.stdout
    stored = stored_tensors(tmp_path / f"eo8-n{sizes[-1]}")
    if variant == "qlora":
        one = stored_tensors(tmp_path / "eo8-n1")
        assert one.keys() == stored.keys() and all(torch.equal(one[k], stored[k]) for k in one)
        assert stored["layers.0.attention.wq.adaptor_a"].shape == (4, 128)
    assert stored["layers.1.feed_forward.w2.weight"].dtype == torch.uint8  # int4, two a byte
    assert stored["output.weight"].dtype == torch.float32  # dequantized, as Meta's loader does

    eo8 = tmp_path / f"eo8-n{sizes[-1]}"
    runs = {k: probe(tmp_path / f"tp{k}.pt", eo8, *([tmp_path / "ref"] if k == 1 else []), nproc=k)
            for k in ((1, 2, 4) if variant == "qlora" else (1, 2))}
    expected = runs[1][str(tmp_path / "ref")]
    for k, run in runs.items():
        got = run[str(eo8)]
        error = ((got["logits"] - expected["logits"]).norm() / expected["logits"].norm()).item()
        print(f"{variant} TP {k}: logits relative error {error:.2e}")
        assert error < 0.01, (k, error)
        assert got["tokens"][0][:4] == expected["tokens"][0][:4], k


def test_int4_eo8_bad_input(tmp_path, small_sp_tokenizer):
    args = ModelArgs(**EO8_ARCH, vocab_size=256)
    write_int4_eo8(random_weights(args), args, tmp_path / "meta", 32)
    shutil.copyfile(small_sp_tokenizer, tmp_path / "meta" / "tokenizer.model")
    edit_params(tmp_path / "meta", quantization_args={"scheme": "int2_weight", "group_size": 32})
    assert_clean_error(run_convert(tmp_path / "meta", tmp_path / "out", nproc=1),
                       'quantization_args scheme "int2_weight" is unknown', "int4_weight_int8_dynamic_activation")
    edit_params(tmp_path / "meta", quantization_args={"group_size": 32})
    assert_clean_error(run_convert(tmp_path / "meta", tmp_path / "out", "--quantize", "int8", nproc=1),
                       "--quantize", "already quantized (Meta's INT4_EO8")
    edit_params(tmp_path / "meta", quantization_args={"group_size": 64})
    assert_clean_error(run_convert(tmp_path / "meta", tmp_path / "out", nproc=1),
                       "layers.0.attention.wq.scales has shape [128, 4], expected [128, 2] for group size 64")
    assert not any(tmp_path.glob("out*"))


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 matrix products (compute capability 8.9+)")
def test_fp8_scaled_mm_on_gpu(tmp_path, fp8_meta, fp8_reference):
    """On Hopper/Ada, --keep_fp8 weights run as torch._scaled_mm with activations quantized per
    token: the product against the dequantized weight, and the model's logits against the
    dequantized model's, both in bfloat16 on the same GPU."""
    from llama import quantize

    g = torch.Generator().manual_seed(0)
    weight, scales = (t.cuda() for t in quantize.quantize(torch.randn(224, 64, generator=g) * 0.05,
                                                           quantize.Scheme("fp8"), torch.float32).values())
    x = torch.randn(5, 64, generator=g).cuda().to(torch.bfloat16)
    operands = quantize.kernel_operands(quantize.Scheme("fp8"), weight, scales, None, torch.bfloat16)
    assert operands[0].dtype == torch.float8_e4m3fn
    got = quantize.linear(x, quantize.Scheme("fp8"), 224, *operands).float()
    expected = x.float() @ (weight.float() * scales[:, None]).T
    product_error = ((got - expected).norm() / expected.norm()).item()
    print(f"fp8 product: relative error {product_error:.2e}")
    assert product_error < 0.05  # e4m3 activations: 3 mantissa bits, about 2-3% per element

    convert(fp8_meta, tmp_path / "kept", 1, "--keep_fp8", "--dtype", "bfloat16")
    result = run_script("tests/quant_probe.py", tmp_path / "gpu.pt", "bfloat16", "--logits", tmp_path / "kept",
                        fp8_reference, gpu=True)
    assert result.returncode == 0, result.stderr
    runs = torch.load(tmp_path / "gpu.pt")
    fp8, dequantized = (runs[str(c)]["logits"] for c in (tmp_path / "kept", fp8_reference))
    logits_error = ((fp8 - dequantized).norm() / dequantized.norm()).item()
    print(f"fp8 model: logits relative error {logits_error:.2e}, greedy tokens "
          f"{runs[str(tmp_path / 'kept')]['tokens']} vs {runs[str(fp8_reference)]['tokens']}")
    assert logits_error < 0.05
