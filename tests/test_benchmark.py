"""benchmark.py: its arithmetic, a TP=2 smoke run whose JSON is checked field by field, its
bad-input messages, and compiled decoding against eager. No test asserts a speed."""

import csv
import importlib.util
import json
import math

import pytest
import torch

from helpers import LLAMA3_TINY, convert, generate_json, make_meta_checkpoint, run_script
from llama import benchmarking as bench
from llama.args import ModelArgs
from llama.model import Transformer

# dim 8, 2 heads of 4, 1 kv head, FFN int(2 * 32 / 3) = 21 rounded up to 24, vocab 10.
SMALL = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, multiple_of=4)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(values, 50) == 2.5
    assert bench.percentile(values, 0) == 1.0 and bench.percentile(values, 100) == 4.0
    assert bench.percentile(values, 90) == pytest.approx(3.7)
    assert bench.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_spread_is_min_median_max():
    assert bench.spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0}


def test_trial_metrics():
    trials = [bench.Trial(ttft_s=0.5, step_s=[0.1, 0.1, 0.2]), bench.Trial(ttft_s=1.0, step_s=[0.2, 0.2, 0.2])]
    m = bench.trial_metrics(trials, batch_size=2, prompt_len=10)
    assert m["ttft_ms"] == {"min": 500.0, "median": 750.0, "max": 1000.0}
    # 2 sequences x 10 prompt tokens in 0.5 s and in 1 s.
    assert m["prefill_tokens_per_s"] == {"min": 20.0, "median": 30.0, "max": 40.0}
    # 3 steps in 0.4 s (7.5 tokens/s per sequence) and in 0.6 s (5).
    assert m["decode_tokens_per_s_per_seq"] == pytest.approx({"min": 5.0, "median": 6.25, "max": 7.5})
    assert m["decode_tokens_per_s_batch"] == pytest.approx({"min": 10.0, "median": 12.5, "max": 15.0})
    # Pooled steps: 0.1, 0.1, 0.2, 0.2, 0.2, 0.2.
    assert m["decode_latency_ms"] == pytest.approx({"p50": 200.0, "p90": 200.0, "p99": 200.0})


def test_decode_bytes_by_hand():
    # Linear weights: wq 8x8 + wk 4x8 + wv 4x8 + wo 8x8 + w1, w2, w3 3 x 24x8 + output 10x8 = 848;
    # norms 3 x 8; one embedding row of 8. KV cache: k and v, 1 layer, 1 kv head, 5 positions, 4 dims.
    assert bench.kv_cache_bytes(SMALL, tp=1, batch_size=1, cache_len=5, element_size=2) == 2 * 5 * 4 * 2
    assert bench.decode_bytes_per_step(SMALL, tp=1, batch_size=1, cache_len=5, element_size=2) == \
        2 * (848 + 24 + 8) + 80


def test_prefill_flops_by_hand():
    """llama2-7b: 6.61 G weights in linear layers (6.74 G less the 131 M embedding), two operations
    each per token, and causal attention's two products over half of 128 x 128 in 32 layers."""
    args = bench.random_model_args("llama2-7b", None, 1, "bfloat16")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert bench.prefill_flops(args, 128) == 2 * linear * 128 + 2 * 32 * 128 * 128 * 4096


def test_decode_bytes_match_the_model():
    """Every weight but the embedding table, one embedding row per sequence, and the cache the
    model actually allocates."""
    args = ModelArgs(**{**LLAMA3_TINY, "max_seq_len": 20}, vocab_size=256)
    model = Transformer(args).to(torch.bfloat16)
    model.setup_kv_cache(15, 4)  # 3 sequences of 20 tokens
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.tok_embeddings.weight
    cache = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                if name.endswith((".kv_cache.k", ".kv_cache.v")))
    assert bench.kv_cache_bytes(args, 1, 3, 20, 2) == cache == model.kv_cache_bytes_per_token() * 60
    assert bench.decode_bytes_per_step(args, 1, 3, 20, 2) == \
        params - embedding.numel() * 2 + 3 * args.dim * 2 + cache
    # Split two ways, each rank reads half of the sharded weights (norms stay whole).
    norms = sum(p.numel() * 2 for name, p in model.named_parameters() if name.endswith("norm.weight"))
    halved = bench.decode_bytes_per_step(args, 2, 3, 20, 2)
    assert halved == (params - embedding.numel() * 2 - norms) // 2 + norms + 3 * args.dim + cache // 2


def test_median_ceiling_is_the_measurement_of_median_rate():
    rounds = [{"read_gb_per_s": r, "matvec_gb_per_s": m, "ceiling_gb_per_s": max(r, m)}
              for r, m in ((9, 12), (20, 18), (15, 14), (3, 4))]
    assert bench.median_ceiling(rounds) == {**rounds[0], "rounds_gb_per_s": [12, 20, 15, 4]}
    assert bench.median_ceiling(rounds[1:]) == {**rounds[2], "rounds_gb_per_s": [20, 15, 4]}


def test_roofline():
    r = bench.roofline(bytes_per_step=2e9, step_s=0.1, ceiling_bytes_per_s=40e9)
    assert r == pytest.approx({"achieved_gb_per_s": 20.0, "ceiling_gb_per_s": 40.0, "fraction_of_ceiling": 0.5})


@pytest.mark.parametrize("shape,params", [("llama2-7b", 6.74e9), ("llama2-13b", 13.0e9), ("llama2-70b", 69.0e9),
                                          ("llama3-8b", 8.03e9), ("llama3-70b", 70.6e9),
                                          ("llama3.2-1b", 1.24e9), ("llama3.2-3b", 3.21e9)])
def test_shapes_have_the_published_parameter_counts(shape, params):
    args = bench.random_model_args(shape, None, 1, "bfloat16")
    counts = {name: math.prod(s) for name, s in args.weight_shapes().items()}
    total = sum(counts.values())
    if shape.startswith("llama3.2"):  # released with the output tied to the embedding
        total -= counts["output.weight"]
    assert total == pytest.approx(params, rel=0.01)


def test_hf_baseline_computes_our_model():
    """The baseline must run the same model: transformers' logits equal ours on the same weights."""
    from llama.distributed import init_runtime

    args = ModelArgs(**LLAMA3_TINY, vocab_size=256)
    runtime = init_runtime()
    try:
        model = bench.build_random_model(args, runtime, torch.float32)
        model.layers[0].attention.wq.weight.to_local().normal_(std=0.3)  # make attention matter
        hf = bench.build_hf_model(model, runtime)
        tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ours = model(tokens, all_logits=True)
            theirs = hf(tokens).logits.float()
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_peak_memory_counts_only_our_runs_without_the_baseline_weights():
    """What ran before (the baseline's trials, the ceiling) and the baseline model's resident
    weights stay out of the project's peak."""
    memory = bench.PeakMemory(torch.device("cpu"))
    outside = torch.ones(256 * 2**20 // 4)  # 256 MiB touched before measuring
    del outside
    resident = torch.nn.Linear(2048, 2048)  # 16 MiB that stays, like the baseline's weights
    with memory.measuring():
        inside = torch.ones(32 * 2**20 // 4)
        del inside
    with_weights = memory.read()["peak_rss_bytes"]
    memory.reset()
    memory.exclude(resident)
    with memory.measuring():
        inside = torch.ones(32 * 2**20 // 4)
        del inside
    rss = bench._peak_rss()  # the high-water mark since the last reset: about the current size
    assert with_weights < rss + 64 * 2**20  # the 256 MiB before measuring are not in it
    assert memory.read()["peak_rss_bytes"] == pytest.approx(with_weights - 16 * 2**20, abs=8 * 2**20)


SPREAD_KEYS = {"min", "median", "max"}
TRIAL_KEYS = {"ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s_per_seq", "decode_tokens_per_s_batch",
              "decode_latency_ms"}
RESULT_KEYS = TRIAL_KEYS | {"dtype", "batch_size", "prompt_len", "gen_len", "bytes_per_decode_step", "roofline",
                            "weight_bytes_per_rank", "kv_cache_bytes_per_rank", "peak_memory_per_rank",
                            "peak_memory_bytes", "baseline", "baseline_ratio", "quantize", "prefill_tflop_per_s"}


def check_trial_figures(figures: dict) -> None:
    for key in TRIAL_KEYS - {"decode_latency_ms"}:
        spread = figures[key]
        assert spread.keys() == SPREAD_KEYS, key
        assert 0 < spread["min"] <= spread["median"] <= spread["max"] < math.inf, key
    latency = figures["decode_latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    per_seq, batch = figures["decode_tokens_per_s_per_seq"], figures["decode_tokens_per_s_batch"]
    assert batch["median"] == pytest.approx(per_seq["median"] * figures["batch_size"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, small_sp_tokenizer):
    root = tmp_path_factory.mktemp("bench")
    make_meta_checkpoint(root / "meta", small_sp_tokenizer, **LLAMA3_TINY)
    convert(root / "meta", root / "dcp")
    return root / "dcp"


def test_benchmark_tp2_reports_every_figure(tmp_path, tiny_checkpoint):
    out, table = tmp_path / "bench.json", tmp_path / "bench.csv"
    result = run_script("benchmark.py", "--converted_ckpt_dir", tiny_checkpoint, "--batch_size", "1,2",
                        "--prompt_len", "5", "--gen_len", "4", "--dtype", "float32,bfloat16", "--trials", "2",
                        "--baseline", "hf", "--output_json", out, "--csv", table, nproc=2)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())

    config = report["config"]
    assert config["world_size"] == 2 and config["device"] == "cpu" and config["compile"] is False
    assert config["torch_version"] == torch.__version__ and config["threads_per_rank"] >= 1
    assert config["model_args"]["dim"] == LLAMA3_TINY["dim"] and config["baseline"] == "hf"
    assert config["trials"] == 2 and config["warmup"] == 1
    for dtype, ceiling in report["bandwidth_ceiling"].items():
        assert ceiling["ceiling_gb_per_s"] == max(ceiling["read_gb_per_s"], ceiling["matvec_gb_per_s"]) > 0
        slowest, median, fastest = ceiling["read_spread_gb_per_s"]  # the reads' spread; the fastest counts
        assert 0 < slowest <= median <= fastest == pytest.approx(ceiling["read_gb_per_s"])
        rounds = ceiling["rounds_gb_per_s"]  # one before each round of trials: 2 batch sizes x 2 trials
        assert len(rounds) == 4 and ceiling["ceiling_gb_per_s"] == sorted(rounds)[1]

    results = report["results"]
    assert [(r["dtype"], r["batch_size"]) for r in results] == \
        [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    args = ModelArgs(**report["config"]["model_args"])
    for r in results:
        assert r.keys() == RESULT_KEYS
        assert (r["prompt_len"], r["gen_len"]) == (5, 4)
        check_trial_figures(r)
        check_trial_figures(r["baseline"] | {"batch_size": r["batch_size"]})
        element_size = 4 if r["dtype"] == "float32" else 2
        # the CPU's decode attention reads each row up to its position: 5 + 4 / 2 on average
        assert r["bytes_per_decode_step"] == 2 * bench.decode_bytes_per_step(args, 2, r["batch_size"], 7, element_size)
        # the pool holds each sequence whole, in blocks of 16 tokens, and one scratch block
        assert r["kv_cache_bytes_per_rank"] == bench.kv_cache_bytes(args, 2, r["batch_size"] + 1, 16, element_size)
        roofline = r["roofline"]
        assert roofline["ceiling_gb_per_s"] == report["bandwidth_ceiling"][r["dtype"]]["ceiling_gb_per_s"]
        assert roofline["fraction_of_ceiling"] == pytest.approx(
            roofline["achieved_gb_per_s"] / roofline["ceiling_gb_per_s"])
        assert 0 < roofline["fraction_of_ceiling"] < 10  # tiny weights live in cache: no upper bound of 1
        assert r["prefill_tflop_per_s"] == pytest.approx(
            r["prefill_tokens_per_s"]["median"] / 5 * bench.prefill_flops(args, 5) / 1e12)
        weights = sum(math.prod(s) for s in args.weight_shapes().values())
        assert weights * element_size / 2 < r["weight_bytes_per_rank"] < weights * element_size
        assert len(r["peak_memory_per_rank"]) == 2
        assert r["peak_memory_bytes"] == max(p["peak_rss_bytes"] for p in r["peak_memory_per_rank"]) > 0
        assert r["baseline_ratio"]["decode_tokens_per_s"] == pytest.approx(
            r["decode_tokens_per_s_per_seq"]["median"] / r["baseline"]["decode_tokens_per_s_per_seq"]["median"])

    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["world_size"] == "2" and float(rows[0]["roofline.achieved_gb_per_s"]) > 0
    assert result.stdout.count("decode tok/s/seq") == 1, "the table is printed once, by rank 0"


@pytest.mark.parametrize("flags,message", [
    (("--random_weights", "llama9-1b"), "--random_weights llama9-1b: unknown shape; choose one of llama2-7b"),
    (("--max_seq_len", "64", "--prompt_len", "40", "--gen_len", "8,30"),
     "--prompt_len + --gen_len reaches 70 tokens, above max_seq_len 64; shorten the sweep or raise --max_seq_len"),
    (("--batch_size", "1,8"), "--batch_size 8 exceeds max_batch_size 4"),
    (("--gen_len", "1"), "--gen_len 1: every value must be at least 2"),
    (("--dtype", "float8"), "--dtype float8: unknown float8"),
], ids=["shape", "seq-len", "batch", "gen-len", "dtype"])
def test_bad_input_is_one_line_on_rank_0(tiny_checkpoint, flags, message):
    source = () if flags[0] == "--random_weights" else ("--converted_ckpt_dir", tiny_checkpoint)
    result = run_script("benchmark.py", *source, *flags, nproc=2)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "[rank" not in result.stderr, "a rank printed a traceback"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed here")
def test_plot_without_matplotlib_is_a_clear_error(tmp_path, tiny_checkpoint):
    result = run_script("benchmark.py", "--converted_ckpt_dir", tiny_checkpoint, "--plot", tmp_path / "p.png")
    assert result.returncode == 1
    assert "error: --plot needs matplotlib: pip install matplotlib" in result.stderr


def test_compiled_decode_gives_the_eager_tokens(tmp_path, tiny_checkpoint):
    """generate.py --compile --stream at TP=2: torch.compile of the DTensor-parallel decode step
    (about a minute of inductor C++ compilation on 2 cores) yields exactly the eager greedy
    tokens, and compiles once: ten prompts of different lengths, decoded one after another,
    stay under dynamo's recompile limit of 8 (each used to recompile)."""
    prompts = [" ".join(["Four score and seven years ago"] * n)[:6 * n] for n in range(1, 11)]
    extra = ("--max_gen_len", "6", "--stream", "--max_batch_size", "1")
    eager = generate_json(tiny_checkpoint, tmp_path / "eager.json", *prompts, nproc=2, extra=extra)
    compiled = generate_json(tiny_checkpoint, tmp_path / "compiled.json", *prompts, nproc=2,
                             extra=(*extra, "--compile"))
    assert [r["tokens"] for r in compiled["results"]] == [r["tokens"] for r in eager["results"]]
    assert all(len(r["tokens"]) > 0 for r in eager["results"])


@pytest.mark.parametrize("flag,package", [(("--baseline", "hf"), "transformers"), (("--plot", "p.png"), "matplotlib")],
                         ids=["baseline", "plot"])
def test_missing_optional_dependency_names_the_flag(monkeypatch, flag, package):
    import benchmark
    from llama.errors import UserError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == package else real_find_spec(name))
    monkeypatch.setattr("sys.argv", ["benchmark.py", "--random_weights", "llama3.2-1b", *flag])
    named = "--baseline hf" if package == "transformers" else "--plot"
    with pytest.raises(UserError, match=f"^{named} needs {package}: pip install {package}, or drop the flag$"):
        benchmark.check_inputs(benchmark.parse_args())
