"""llama/cpu_linear.py: the float32 products from bf16 weights used on CPUs without native
bf16, and the choice of when to use them."""

import subprocess
import sys

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
