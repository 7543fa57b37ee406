"""llama/cpu_linear.py: the float32 products from bf16 weights used on CPUs without native
bf16, and the choice of when to use them."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO
from llama import cpu_linear


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact product in float64, rounded once to bf16."""
    return F.linear(x.double(), w.double()).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [
    (1, 2048, 512),  # decode: one row, through cpu_linear.c
    (3, 2050, 77),  # a few rows; K not a multiple of the vector width, N not of the rows per step
    (6, 300, 130),  # the most rows in one pass over the weight
    (32, 64, 256),  # the most rows cpu_linear.c takes
    (33, 300, 4000),  # a GEMM on the upcast weight, in two blocks
    (130, 2048, 700),  # prefill
])
def test_fp32_products_of_bf16_weights(shape):
    assert cpu_linear._library() is not None  # else a few rows would silently take the GEMM
    rows, k, n = shape
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    got = cpu_linear._bf16_linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # float32 accumulation, then one rounding: within one bf16 step of the exact product
    torch.testing.assert_close(got.float(), reference(x, w).float(), rtol=2**-7, atol=1e-3)


def test_any_leading_dims_and_strides():
    x = torch.randn(2, 5, 3, 96).bfloat16()[:, ::2, 1]  # (2, 3, 96), not contiguous
    w = torch.randn(200, 96).bfloat16()
    torch.testing.assert_close(cpu_linear._bf16_linear(x, w).float(), reference(x, w).float(), rtol=2**-7, atol=1e-3)


def test_compiled_equals_eager():
    x, w = torch.randn(2, 1, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    compiled = torch.compile(cpu_linear.linear, fullgraph=True)
    assert torch.equal(compiled(x, w), cpu_linear.linear(x, w))


def test_other_dtypes_keep_f_linear():
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_an_avx2_limit_means_no_native_bf16(env):
    """How an AVX2-only CPU is emulated on a newer one: either limit turns the fp32 path on."""
    code = "from llama import cpu_linear; print(cpu_linear.NATIVE_BF16)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), **env}, check=True).stdout
    assert out.strip() == "False"


def _transparent_huge_pages() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""


@pytest.mark.skipif("[madvise]" not in _transparent_huge_pages(),
                    reason="transparent huge pages are not given on request (madvise) on this kernel")
def test_large_tensors_of_a_script_lie_on_huge_pages():
    """Importing llama before any tensor exists (as the scripts do) puts torch's large CPU
    allocations, the weights among them, on 2 MiB pages."""
    code = ("import torch, llama; t = torch.ones(64 << 20, dtype=torch.uint8); "
            "print(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0])")
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            check=True)
    assert int(run(env={"PYTHONPATH": str(REPO)}).stdout) >= 2048  # kB: at least one huge page
    assert int(run(env={"PYTHONPATH": str(REPO), "THP_MEM_ALLOC_ENABLE": "0"}).stdout) == 0


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's query heads over its keys 0..position, in float64, one head at a time."""
    bsz, n_heads, _, head_dim = q.shape
    group = n_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(bsz):
        n = int(positions[b]) + 1
        for h in range(n_heads):
            keys, values = k[b, h // group, :n].double(), v[b, h // group, :n].double()
            out[b, h, 0] = torch.softmax(keys @ q[b, h, 0].double() / head_dim**0.5, dim=0) @ values
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [
    (1, 32, 8, 256, 64),  # llama3.2-1b's heads
    (3, 8, 8, 37, 128),  # no grouping; positions 0 and the last
    (2, 6, 2, 19, 16),
])
def test_decode_attention_reads_each_row_up_to_its_position(shape, dtype):
    from llama.model import one_query_attention, torch_one_query_attention

    bsz, n_heads, n_kv_heads, seq, head_dim = shape
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(bsz, n_heads, 1, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(bsz, n_kv_heads, seq, head_dim, generator=g).to(dtype) for _ in range(2))
    positions = torch.tensor([seq - 1, 0, seq // 2][:bsz])[:, None]
    expected = reference_attention(q, k, v, positions)
    torch_version = torch_one_query_attention(q, k, v, (torch.arange(seq) <= positions)[:, None, None, :])
    for b in range(bsz):  # what lies past a row's position is never read
        k[b, :, positions[b] + 1:] = v[b, :, positions[b] + 1:] = float("nan")
    assert cpu_linear.decode_attention_applies(q, k, v)
    got = one_query_attention(q, k, v, positions)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = dict(rtol=2**-7, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), expected, **tolerance)
    torch.testing.assert_close(got, torch_version, **tolerance)
    compiled = torch.compile(one_query_attention, fullgraph=True)(q, k, v, positions)
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)
