"""This project's CPU inference beside llama.cpp's on the same machine (issue 25): decode bytes
streamed per second and prefill tokens per second, bf16 / int8 vs Q8_0 / int4 vs pure Q4_0.

    python3 tools/llamacpp_side_by_side.py --work_dir ~/.cache/tp-llama-llamacpp [--rounds 2]

Everything it needs goes under --work_dir, none of it into this project's requirements:
1. llama.cpp, the copy vendored in the llama-cpp-python sdist (`pip download`, the package
   registry only), built with cmake (-DGGML_NATIVE=ON, Release): llama-bench and llama-quantize.
2. A transformers LlamaForCausalLM of the Llama 3.2 1B shape with random bf16 weights and the
   32k sentencepiece vocabulary shipped in mistral-common, saved with save_pretrained, converted
   by llama.cpp's own convert_hf_to_gguf.py to bf16, then llama-quantize'd to Q8_0 and --pure Q4_0.
3. Rounds of llama-bench (pp/tg) and this project's benchmark.py (--random_weights llama3.2-1b,
   its 128k vocabulary, --compile), the same threads, prompt and generated lengths: format by
   format, the two back to back, which goes first alternating.

The vocabularies differ (32k vs 128k), so decode is compared in bytes a step reads times tokens
per second. llama.cpp's bytes per step: every tensor of the GGUF as stored except the token
embedding (one row of it is read), plus the f16 KV cache of the positions attended (llama-bench
generates from an empty cache: on average (gen_len + 1) / 2). Ours: benchmark.py's own count
(linear weights as stored, norms, one embedding row, the bf16 KV cache attended). Prefill
tokens per second compare directly: both compute the logits of the prompt's last token only.
Each round records the load average, and the read ceiling (llama.cpu_linear.read_memory, as
benchmark.py measures its own) just before and after each llama-bench run: this host's memory
bandwidth moves between ~36 and ~62 GB/s from minute to minute, so that two runs a minute apart
may meet different memory, and decode is also compared as each run's share of the ceiling
measured around it. Ratios are taken within a round and their median printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this repository's llama package, run as python3 tools/...
SDIST_VERSION = "0.3.36"
# (our --quantize name, llama.cpp type, llama-quantize's extra arguments): --pure keeps every
# tensor Q4_0, as our int4 quantizes every linear weight alike (no Q6_K output layer).
FORMATS = (("none", "bf16", ()), ("int8", "Q8_0", ()), ("int4", "Q4_0", ("--pure",)))
# This project's `llama3.2-1b` shape with mistral-common's 32k vocabulary.
SHAPE, VOCAB = "llama3.2-1b", 32000


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kwargs)


def llama_cpp_source(work: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded once."""
    tarball = work / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={SDIST_VERSION}", "-d", work])
    source = work / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if not source.exists():
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="data")
    return source


def build(source: Path, work: Path, jobs: int) -> Path:
    """llama-bench and llama-quantize, built once under `nice` (the host may be shared)."""
    build_dir = work / "build"
    binaries = build_dir / "bin"
    if not (binaries / "llama-bench").exists() or not (binaries / "llama-quantize").exists():
        run(["cmake", "-S", source, "-B", build_dir, "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DCMAKE_BUILD_TYPE=Release"])
        run(["nice", "cmake", "--build", build_dir, "--target", "llama-bench", "llama-quantize", f"-j{jobs}"])
    return binaries


def hf_model(work: Path) -> Path:
    """A random-weight transformers model saved with save_pretrained, with its tokenizer.model."""
    import mistral_common
    import torch
    from transformers import LlamaForCausalLM

    from llama.args import ModelArgs
    from llama.benchmarking import SHAPES, hf_config

    out = work / "hf-llama3.2-1b-shape-32k"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(hf_config(ModelArgs(**{**SHAPES[SHAPE], "vocab_size": VOCAB}), torch.bfloat16))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    # The sentencepiece model as a Llama 2 repository holds it: convert_hf_to_gguf.py reads it
    # with sentencepiece.
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    return out


def gguf_models(source: Path, binaries: Path, hf_dir: Path, work: Path) -> dict[str, Path]:
    """Our --quantize name -> its GGUF: bf16 from convert_hf_to_gguf.py, the rest quantized from it."""
    bf16 = work / "llama3.2-1b-shape-32k-bf16.gguf"
    if not bf16.exists():
        run([sys.executable, source / "convert_hf_to_gguf.py", hf_dir, "--outtype", "bf16", "--outfile", bf16])
    models = {"none": bf16}
    for ours, kind, extra in FORMATS[1:]:
        models[ours] = work / f"llama3.2-1b-shape-32k-{kind}.gguf"
        if not models[ours].exists():
            run([binaries / "llama-quantize", *extra, bf16, models[ours], kind])
    return models


def gguf_decode_bytes(source: Path, path: Path, positions: float) -> float:
    """Bytes one llama.cpp decode step reads: every stored tensor but the token embedding, one
    row of that, and the f16 keys and values of `positions` positions in every layer."""
    gguf_py = str(source / "gguf-py")  # llama.cpp's own reader, not installed
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    reader = gguf.GGUFReader(path)
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    arch = field("general.architecture")
    total = 0
    for tensor in reader.tensors:
        total += tensor.n_bytes if tensor.name != "token_embd.weight" else tensor.n_bytes // tensor.shape[-1]
    head_dim = field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count")
    kv_per_position = 2 * field(f"{arch}.block_count") * field(f"{arch}.attention.head_count_kv") * head_dim * 2
    return total + kv_per_position * positions


@functools.cache
def _read_buffer():
    import torch

    return torch.ones(1 << 30, dtype=torch.uint8)  # 1 GiB, made once


def read_ceiling_gb_s(threads: int) -> float:
    """The memory read ceiling now, as benchmark.py measures its own: the fastest of 3 reads of
    1 GiB by llama.cpu_linear.read_memory (every thread its own part, prefetched)."""
    import torch

    from llama import cpu_linear

    torch.set_num_threads(threads)
    buffer, times = _read_buffer(), []
    for _ in range(3):
        start = time.perf_counter()
        cpu_linear.read_memory(buffer)
        times.append(time.perf_counter() - start)
    return buffer.numel() / min(times) / 1e9


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def llama_bench(binaries: Path, model: Path, args: argparse.Namespace) -> dict[str, float]:
    """llama-bench's median prefill and decode tokens/s over its repetitions."""
    out = run([binaries / "llama-bench", "-m", model, "-t", args.threads, "-p", args.prompt_len, "-n", args.gen_len,
               "-r", args.repetitions, "-o", "json"], capture_output=True, text=True).stdout
    tests = json.loads(out)
    rate = lambda t: statistics.median(t["samples_ts"])  # noqa: E731
    return {"prefill_tok_s": next(rate(t) for t in tests if t["n_prompt"] and not t["n_gen"]),
            "decode_tok_s": next(rate(t) for t in tests if t["n_gen"] and not t["n_prompt"])}


def ours(args: argparse.Namespace, work: Path, round_no: int, name: str) -> dict[str, float]:
    """benchmark.py's figures for one --quantize name."""
    report = work / f"ours-round{round_no}-{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    run([sys.executable, REPO / "benchmark.py", "--random_weights", SHAPE, "--quantize", name,
         "--compile", "--batch_size", 1, "--prompt_len", args.prompt_len, "--gen_len", args.gen_len,
         "--trials", args.repetitions, "--warmup", 1, "--output_json", report], env=env, cwd=REPO)
    [result] = json.loads(report.read_text())["results"]
    return {"prefill_tok_s": result["prefill_tokens_per_s"]["median"],
            "decode_tok_s": result["decode_tokens_per_s_per_seq"]["median"],
            "decode_gb_s": result["roofline"]["achieved_gb_per_s"],
            "ceiling_gb_s": result["roofline"]["ceiling_gb_per_s"],
            "bytes_per_step": result["bytes_per_decode_step"]}


def table(rounds: list[dict]) -> str:
    """Markdown: medians over rounds of each figure, and of the per-round ratios. The share of the
    read ceiling compares runs that met the host's memory at different speeds."""
    lines = ["| format | decode GB/s, ours vs llama.cpp | decode, share of the read ceiling around each run | "
             "prefill tok/s, ours vs llama.cpp |", "|---|---|---|---|"]
    share = lambda f: f["decode_gb_s"] / f["ceiling_gb_s"]  # noqa: E731
    for name, kind, _ in FORMATS:
        cells = []
        for metric, digits, percent in (("decode_gb_s", 1, False), (share, 0, True), ("prefill_tok_s", 0, False)):
            value = metric if callable(metric) else lambda f, m=metric: f[m]
            a = [value(r["ours"][name]) for r in rounds]
            b = [value(r["llama.cpp"][name]) for r in rounds]
            ratio = statistics.median([x / y for x, y in zip(a, b)])
            scale, unit = (100, "%") if percent else (1, "")
            cells.append(f"{scale * statistics.median(a):.{digits}f}{unit} vs {scale * statistics.median(b):.{digits}f}"
                         f"{unit} ({ratio:.2f}×)")
        label = "bf16" if kind == "bf16" else f"{name} vs {kind}"
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, required=True, help="sdist, build, models and reports (several GB)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both (default 2; 0: build and "
                   "prepare the models only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--gen_len", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=3, help="llama-bench -r and benchmark.py --trials")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the llama.cpp build")
    args = p.parse_args()
    work = args.work_dir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)

    source = llama_cpp_source(work)
    binaries = build(source, work, args.jobs)
    models = gguf_models(source, binaries, hf_model(work), work)
    attended = (args.gen_len + 1) / 2
    steps = {name: gguf_decode_bytes(source, path, attended) for name, path in models.items()}
    for name, nbytes in steps.items():
        print(f"llama.cpp {name}: {models[name].name}, {nbytes / 1e9:.3f} GB read per decode step")

    rounds = []
    for round_no in range(args.rounds):
        figures: dict[str, dict] = {"ours": {}, "llama.cpp": {}}
        loads = [load()]
        for i, (name, _, _) in enumerate(FORMATS):
            # Each format's two runs back to back, which goes first alternating, so neither always
            # runs in the other's wake: the host's memory bandwidth moves from minute to minute
            # (the benchmark's read ceiling ~36 or ~60 GB/s), and runs minutes apart measure that.
            order = ("llama.cpp", "ours") if (round_no + i) % 2 == 0 else ("ours", "llama.cpp")
            for side in order:
                if side == "ours":
                    figures["ours"][name] = ours(args, work, round_no, name)
                else:  # its ceiling measured just before and after it (the lower: the harder share for us)
                    before = read_ceiling_gb_s(args.threads)
                    rates = llama_bench(binaries, models[name], args)
                    ceilings = [before, read_ceiling_gb_s(args.threads)]
                    figures["llama.cpp"][name] = {**rates, "decode_gb_s": rates["decode_tok_s"] * steps[name] / 1e9,
                                                  "bytes_per_step": steps[name], "ceiling_gb_s": min(ceilings),
                                                  "ceilings_gb_s": ceilings}
            loads.append(load())
        rounds.append({**figures, "load_average_1/5/15": loads})
        print(f"round {round_no + 1} (load averages before and after each format: {', '.join(loads)}):")
        for name in models:
            o, l = figures["ours"][name], figures["llama.cpp"][name]
            print(f"  {name}: decode {o['decode_gb_s']:.1f} vs {l['decode_gb_s']:.1f} GB/s "
                  f"({o['decode_tok_s']:.2f} vs {l['decode_tok_s']:.2f} tok/s), "
                  f"prefill {o['prefill_tok_s']:.1f} vs {l['prefill_tok_s']:.1f} tok/s; ceilings "
                  f"{o['ceiling_gb_s']:.1f} (ours) and {'/'.join(f'{c:.1f}' for c in l['ceilings_gb_s'])} GB/s "
                  "(before/after llama.cpp's)", flush=True)
        (work / "side_by_side.json").write_text(json.dumps(rounds, indent=2) + "\n")  # kept if a later round fails
    if rounds:
        print(table(rounds))


if __name__ == "__main__":
    main()
