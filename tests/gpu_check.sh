#!/usr/bin/env bash
# The GPU check, run as it is on a machine with NVIDIA GPUs, from the repository or anywhere:
#
#     bash tests/gpu_check.sh
#
# In under 10 minutes:
#   1. the GPU smoke test (tests/test_gpu_smoke.py: float32 at every TP degree the GPUs allow,
#      eager and --compile, against TP=1; the benchmark beside transformers; a lost rank under
#      NCCL; the demo; every process must exit), within a time limit;
#   2. benchmark.py --random_weights llama2-7b in bfloat16 at TP=1, eager;
#   3. the same with --compile;
#   4. the same in int8 and int4 weights (compiled);
#   5. serve.py (compiled) under benchmark.py --serve at 1 and 8 clients, when GPU_CHECK_TOKENIZER
#      names a 32000-token sentencepiece model and fastapi/uvicorn are importable;
# then one table, printed last: each step's outcome, decode tokens/s, and the fraction of the
# card's HBM bandwidth a decode step uses (of the card's published figure, and of the ceiling
# the benchmark measures on it). Logs, JSON and the table go to $OUT when it is set, otherwise
# to a new folder under /tmp. Nothing is installed: a step whose packages are missing is
# skipped and says which. Steps 1-3 take at most 8 minutes; every step is also cut to what is
# left of GPU_CHECK_BUDGET_S (default 600) and skipped once less than a minute is left, so the
# whole check ends in time. The exit status is 0 only if no step failed.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
export out
mkdir -p "$out"
summary="$out/steps.tsv"
: > "$summary"
budget_end=$((SECONDS + ${GPU_CHECK_BUDGET_S:-600}))

# step NAME SECONDS MODULES COMMAND...: run COMMAND (a program, or a function of this script)
# with its output in $out/NAME.log, killed after SECONDS; skipped when importing one of the
# comma-separated Python MODULES (a script of this repository imports all it needs) finds a
# package missing.
step() {
    local name=$1 seconds=$2 modules=$3
    shift 3
    local left=$((budget_end - SECONDS))
    if [ "$left" -lt 60 ]; then
        printf '%s	skipped (out of time: GPU_CHECK_BUDGET_S)	0
' "$name" >> "$summary"
        echo "[$name] skipped: out of time"
        return
    fi
    [ "$seconds" -gt "$left" ] && seconds=$left
    echo "[$name] running (at most ${seconds}s): $*"
    if declare -F "$1" > /dev/null; then  # timeout runs programs: a function gets a bash of its own
        set -- bash -c "$(declare -f "$1")"$'\n''"$@"' "$0" "$@"
    fi
    local missing
    missing=$(python3 -c "
import importlib, sys
for module in sys.argv[1].split(','):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        print(e.name, end=' ')" "$modules" 2>/dev/null)
    if [ -n "$missing" ]; then
        printf '%s\tskipped (missing: %s)\t0\n' "$name" "$missing" >> "$summary"
        echo "[$name] skipped: missing $missing"
        return
    fi
    local start=$SECONDS status
    timeout --kill-after=20 "$seconds" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT after ${seconds}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%d\n' "$name" "$status" $((SECONDS - start)) >> "$summary"
    echo "[$name] $status in $((SECONDS - start))s (log: $out/$name.log)"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'GPUs', torch.cuda.device_count())" > "$out/versions.txt" 2>&1

step smoke 260 pytest,sentencepiece \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_smoke.py
bench=(benchmark.py --random_weights llama2-7b --dtype bfloat16 --batch_size 1 --prompt_len 128 --gen_len 128
       --trials 3 --warmup 1)
step bench-eager 70 benchmark torchrun --standalone --nproc_per_node 1 "${bench[@]}" --output_json "$out/bench-eager.json"
step bench-compile 150 benchmark torchrun --standalone --nproc_per_node 1 "${bench[@]}" --compile \
    --output_json "$out/bench-compile.json"
step bench-quant 110 benchmark torchrun --standalone --nproc_per_node 1 "${bench[@]}" --quantize int8,int4 --compile \
    --output_json "$out/bench-quant.json"

# serve.py on random llama2-7b weights (any 32000-token sentencepiece model as tokenizer, from
# $GPU_CHECK_TOKENIZER), compiled, under the load generator at concurrency 1 and 8.
serve_and_load() {
    local log=$out/serve-server.log port=8765
    torchrun --standalone --nproc_per_node 1 serve.py --random_weights llama2-7b --tokenizer_path "$1" \
        --max_batch_size 8 --max_seq_len 256 --compile --port $port > "$log" 2>&1 &
    local launcher=$!
    for _ in $(seq 150); do grep -q "^serving" "$log" && break; sleep 1; done
    python3 benchmark.py --serve http://127.0.0.1:$port/v1 --concurrency 1,8 --requests 16 --prompt_len 128 \
        --gen_len 128 --output_json "$out/serve-load.json"
    local rc=$?
    kill -TERM $launcher; wait $launcher
    return $rc
}
if [ -n "${GPU_CHECK_TOKENIZER:-}" ]; then
    step serve 170 fastapi,uvicorn,httpx serve_and_load "$GPU_CHECK_TOKENIZER"
else
    printf 'serve\tskipped (set GPU_CHECK_TOKENIZER)\t0\n' >> "$summary"
fi
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader > "$out/leftover.txt" 2>&1

python3 - "$out" > "$out/table.txt" <<'EOF'
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
# Published HBM bandwidth, GB/s; the first name fragment found in the device name wins.
HBM_GB_PER_S = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
                ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300)]
print("GPU check:", (out / "versions.txt").read_text().strip())
print((out / "gpus.csv").read_text().strip())
print()
print(f"{'step':<14} {'outcome':<32} {'seconds':>7}")
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    print(f"{name:<14} {status:<32} {seconds:>7}")
smoke = out / "smoke.log"
if smoke.exists():
    tail = [line for line in smoke.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    print("smoke test:", tail[-1] if tail else "no pytest summary (see smoke.log)")
print()
header = ("llama2-7b bf16 TP=1", "decode tok/s", "p50 ms", "prefill tok/s", "GB/s", "of HBM", "of ceiling")
rows = [header]
for mode in ("eager", "compile"):
    path = out / f"bench-{mode}.json"
    if not path.exists():
        rows.append((mode, "-", "-", "-", "-", "-", "-"))
        continue
    report = json.loads(path.read_text())
    name = report["config"]["device_name"]
    nominal = next((gbs for fragment, gbs in HBM_GB_PER_S if fragment in name), None)
    r = report["results"][0]
    achieved = r["roofline"]["achieved_gb_per_s"]
    rows.append((f"{mode} ({name})", f"{r['decode_tokens_per_s_batch']['median']:.1f}",
                 f"{r['decode_latency_ms']['p50']:.2f}", f"{r['prefill_tokens_per_s']['median']:.0f}",
                 f"{achieved:.0f}", f"{achieved / nominal:.0%} of {nominal}" if nominal else "unknown card",
                 f"{r['roofline']['fraction_of_ceiling']:.0%} of {r['roofline']['ceiling_gb_per_s']:.0f}"))
widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
for row in rows:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
quant = out / "bench-quant.json"
if quant.exists():
    print()
    print("llama2-7b TP=1 compiled, by weights: decode tok/s, GB/s read, fraction of the measured ceiling")
    for r in json.loads(quant.read_text())["results"]:
        print(f"  {r.get('quantize') or 'bf16':<6} {r['decode_tokens_per_s_batch']['median']:8.1f}"
              f" {r['roofline']['achieved_gb_per_s']:8.0f} {r['roofline']['fraction_of_ceiling']:6.0%}")
load = out / "serve-load.json"
if load.exists():
    print()
    print("serve.py llama2-7b compiled, 128 + 128 tokens: clients, req/s, output tok/s, TTFT p50/p99 ms, ITL p50/p99 ms")
    for r in json.loads(load.read_text())["results"]:
        print(f"  {r['concurrency']:>2} {r['requests_per_s']:6.2f} {r['output_tokens_per_s']:8.1f}"
              f" {r['ttft_ms']['p50']:7.0f}/{r['ttft_ms']['p99']:<7.0f} {r['inter_token_ms']['p50']:6.1f}/{r['inter_token_ms']['p99']:.1f}")
leftover = (out / "leftover.txt").read_text().strip()
print()
print("GPU processes left running:", leftover or "none")
EOF
echo "(logs and this table in $out)"
cat "$out/table.txt"
! grep -qE $'\t(FAILED|TIMED OUT)' "$summary"
