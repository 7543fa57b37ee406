"""llama/cpu_linear.py: the float32 products from bf16 weights used on CPUs without native
bf16, and the choice of when to use them."""

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


class RecordedOps(TorchDispatchMode):
    """The aten operators called inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_decode_steps_rows_are_one_matrix_product():
    """A decode step's attention output, (batch, 1, dim), reaches the products with an odd stride
    on its length-1 dimension, as a compiled step lays it out. It must still be one matrix
    product: torch's matmul makes such an input a batch of products by copies of the weight."""
    x = torch.randn(8, 64).as_strided((8, 1, 64), (64, 16, 1))
    w = torch.randn(32, 64)
    with RecordedOps() as ops:
        y = cpu_linear.linear(x, w)
    assert "aten.bmm" not in ops.names and ops.names.count("aten.mm") == 1, ops.names
    torch.testing.assert_close(y, (x.reshape(8, 64) @ w.T).view(8, 1, 32))


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_an_avx2_limit_means_no_native_bf16(env):
    """How an AVX2-only CPU is emulated on a newer one: either limit turns the fp32 path on."""
    code = "from llama import cpu_linear; print(cpu_linear.NATIVE_BF16)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), **env}, check=True).stdout
    assert out.strip() == "False"


def test_avx2_emulation_takes_todays_paths():
    """An AVX2-only CPU emulated on a newer one, with this project's switch too: no native bf16,
    and every cpu_linear.c kernel the AVX2 one. A bad value of the switch is one line naming it."""
    code = "from llama import cpu_linear; print(cpu_linear.NATIVE_BF16, cpu_linear._bf16_isa(), cpu_linear._quantized_isa())"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           cpu_linear.ISA_VARIABLE: "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert out.stdout.split() == ["False", "0", "0"]
    if cpu_linear._avx512_isa("bf16") == cpu_linear.ISA_AVX512:  # and without the switch: AVX-512's
        del env[cpu_linear.ISA_VARIABLE]
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                             check=True)
        assert out.stdout.split()[1] == "1"
    env[cpu_linear.ISA_VARIABLE] = "sse"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode != 0 and "TP_LLAMA_CPU_ISA=sse: use avx2 or avx512" in bad.stderr


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
    (1, 32, 8, 256, 64, 16),  # llama3.2-1b's heads
    (3, 8, 8, 37, 128, 16),  # no grouping; positions 0 and the last, a block partly used
    (2, 6, 2, 19, 16, 5),  # blocks of a size that is not a multiple of the kernel's 8 positions
    (2, 64, 8, 300, 128, 16),  # llama3.1-70b's heads: 8 a group (AVX-512: 2 at a time)
    (2, 12, 4, 45, 64, 7),  # 3 a group; blocks of 7, positions not a multiple of 16
])
def test_decode_attention_follows_block_tables_up_to_each_position(shape, dtype, kernel_isa):
    """The C kernel of each instruction set and the torch version (the GPU's, run here on CPU) read
    each sequence's keys through its block table, in a pool whose blocks are shuffled between
    sequences. (AVX-512 takes bfloat16 heads of 64 or 128: the other cases run its AVX2 path.)"""
    from llama.model import KVCache, paged_decode_attention, torch_paged_decode_attention

    forced(kernel_isa, cpu_linear._bf16_isa(), "avx512_bf16")

    bsz, n_heads, n_kv_heads, seq, head_dim, block = shape
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(bsz, n_heads, 1, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(bsz, n_kv_heads, seq, head_dim, generator=g).to(dtype) for _ in range(2))
    positions = torch.tensor([seq - 1, 0, seq // 2][:bsz])
    expected = reference_attention(q, k, v, positions)
    width = -(-seq // block)
    cache = KVCache(bsz * width + 3, n_kv_heads, block, head_dim, dtype, torch.device("cpu"))
    cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))  # what no table points to is never read
    tables = torch.randperm(bsz * width + 3, generator=g)[:bsz * width].view(bsz, width)
    for b in range(bsz):
        n = int(positions[b]) + 1  # only up to the position: the rest of the blocks stays NaN
        slots = tables[b, torch.arange(n) // block] * block + torch.arange(n) % block
        cache.write(slots, k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1))
    assert cpu_linear.decode_attention_applies(q, cache.k, cache.v)
    got = paged_decode_attention(q, cache, tables, positions)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = dict(rtol=2**-7, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), expected, **tolerance)
    cache.k.nan_to_num_(0.0), cache.v.nan_to_num_(0.0)  # the torch version multiplies every position by its mask
    torch.testing.assert_close(torch_paged_decode_attention(q, cache, tables, positions), got, **tolerance)
    torch._dynamo.reset()  # the instruction set is a constant of the compiled graph
    compiled = torch.compile(paged_decode_attention, fullgraph=True)(q, cache, tables, positions)
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)


def test_avx512_attention_is_its_own_path():
    """With bfloat16 heads of 64, the AVX-512 path runs: seen through the one thing it computes
    otherwise, subnormal bfloat16 queries (vdpbf16ps reads them as zero; a model's queries never
    are subnormal), which make every score 0 there and each output the values' mean, where the
    AVX2 path's float32 products of 2^-128 and 2^127 weigh the positions unequally."""
    if cpu_linear._bf16_isa() != cpu_linear.ISA_AVX512:
        pytest.skip("this CPU or compiler has no AVX-512 F/BW/VL/DQ with avx512_bf16: its attention cannot run here")
    g = torch.Generator().manual_seed(3)
    signs = lambda *shape: torch.randint(0, 2, shape, generator=g).float() * 2 - 1  # noqa: E731
    k = (signs(20, 8, 16, 64) * 2.0**127).bfloat16()
    v = torch.randn(20, 8, 16, 64, generator=g).bfloat16()
    q = (signs(1, 32, 1, 64) * 2.0**-128).bfloat16()
    assert q.abs().min() > 0
    tables, positions = torch.randperm(20, generator=g)[:16].view(1, 16), torch.tensor([250])
    avx2, avx512 = (cpu_linear._decode_attention(q, k, v, tables, positions, isa)
                    for isa in (cpu_linear.ISA_AVX2, cpu_linear.ISA_AVX512))
    values = v[tables[0]].permute(1, 0, 2, 3).reshape(8, 256, 64)[:, :251].float()  # (kv heads, positions, dim)
    mean = values.mean(dim=1).repeat_interleave(4, dim=0).view(1, 32, 1, 64)
    torch.testing.assert_close(avx512.float(), mean, rtol=2**-7, atol=1e-3)
    assert (avx2.float() - mean).abs().max() > 0.05


@pytest.fixture(params=["avx2", "avx512"])
def kernel_isa(request, monkeypatch):
    """Each instruction set of cpu_linear.c's kernels, forced with TP_LLAMA_CPU_ISA (the choice is
    made once per process: the cached choices are cleared before and after)."""
    def clear():
        for choice in (cpu_linear._bf16_isa, cpu_linear._quantized_isa):
            choice.cache_clear()
    monkeypatch.setenv(cpu_linear.ISA_VARIABLE, request.param)
    clear()
    yield request.param
    monkeypatch.undo()
    clear()


def forced(isa: str, chosen: int, feature: str) -> None:
    """Skip (saying why) where this CPU or compiler cannot run the forced path; else check it runs."""
    if isa == "avx512" and chosen != cpu_linear.ISA_AVX512:
        pytest.skip(f"this CPU or compiler has no AVX-512 F/BW/VL/DQ with {feature}: its kernels cannot run here")
    assert chosen == (cpu_linear.ISA_AVX512 if isa == "avx512" else cpu_linear.ISA_AVX2)


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_kernel_of_each_instruction_set(kernel_isa, threads):
    """The bf16 kernel over the shapes above that it takes (up to FEW_ROWS rows), both paths
    within one bf16 step of the exact product."""
    forced(kernel_isa, cpu_linear._bf16_isa(), "avx512_bf16")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, k, n in [(1, 2048, 512), (3, 2050, 77), (6, 300, 130), (32, 64, 256), (5, 33, 9), (2, 96, 200)]:
            g = torch.Generator().manual_seed(rows + k)
            x = torch.randn(rows, k, generator=g).bfloat16()
            w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
            got = cpu_linear._bf16_kernel(x, w)
            torch.testing.assert_close(got.float(), reference(x, w).float(), rtol=2**-7, atol=1e-3)
    finally:
        torch.set_num_threads(before)


def test_bf16_tiles_are_the_float32_rows_rounded():
    """dequantize_rows' AVX-512 path (bf16 tiles for prefill's GEMM, straight from the stored
    values) writes the float32 path's rows rounded to bf16, bit for bit: int8 (1000 columns: a
    last partial 32) and int4 at every group size, scales bf16 and float32."""
    from llama import quantize

    if cpu_linear._bf16_isa() != cpu_linear.ISA_AVX512:
        pytest.skip("this CPU or compiler has no AVX-512 F/BW/VL/DQ with avx512_bf16: its tiles cannot be made here")
    lib = cpu_linear._library()
    for (n, k), group, dtype in itertools.product([(40, 256), (9, 4096), (33, 1000)], [0, *quantize.GROUP_SIZES],
                                                  [torch.float32, torch.bfloat16]):
        if group and k % group:
            continue
        scheme = quantize.Scheme("int4", group) if group else quantize.Scheme("int8")
        stored = quantize.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + group)), scheme, dtype)
        w, s = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"), dtype)
        tiles = [torch.empty(n, k, dtype=torch.bfloat16) for _ in range(2)]
        for tile, isa in zip(tiles, (cpu_linear.ISA_AVX2, cpu_linear.ISA_AVX512)):
            assert lib.dequantize_rows(w.data_ptr(), w.stride(0), s.data_ptr(), s.dtype == torch.bfloat16, group, k, 0, n,
                                       tile.data_ptr(), 1, 2, isa) == 0
        assert torch.equal(*tiles), (n, k, group, dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_kernels_of_each_instruction_set(kernel_isa, threads):
    """int8 and int4 kernels against the dequantized product, activations and scales float32 and
    bf16; (out, in) shapes with rows of 64 + 128 columns (a last half block; int8: units of 4 and 2
    blocks), of 4096 columns, of 1000 (int8: not whole blocks, a GEMM), odd counts of output rows; every group size; 1-4 activation rows (one pass), 5 (4
    and 1), QUANTIZED_FEW_ROWS, and 42 (prefill: a GEMM on dequantized tiles). int8: AVX-512 VNNI's integer sums are AVX2's, and its outputs
    AVX2's bit for bit; int4: the same integer sums, the float ones in another order."""
    from llama import quantize

    forced(kernel_isa, cpu_linear._quantized_isa(), "VNNI")
    # Products of many rows multiply bf16 tiles where torch has native bf16 and AVX-512 is allowed
    bf16_tiles = cpu_linear._native_bf16_tiles()
    assert bf16_tiles == (cpu_linear.NATIVE_BF16 and kernel_isa == "avx512")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (n, k), group, dtype in itertools.product([(40, 256), (77, 192), (130, 2048), (9, 4096), (33, 1000)],
                                                      [0, *quantize.GROUP_SIZES], [torch.float32, torch.bfloat16]):
            if group and k % group:
                continue
            scheme = quantize.Scheme("int4", group) if group else quantize.Scheme("int8")
            g = torch.Generator().manual_seed(n + k + group)
            weight = torch.randn(n, k, generator=g) * 0.05
            stored = quantize.quantize(weight, scheme, dtype)
            operands = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"), dtype)
            dequantized = quantize.dequantize(stored["weight"], stored["scales"], stored.get("zeros")).double()
            x = torch.randn(42, k, generator=g).to(dtype)
            for rows in (1, 2, 3, 4, 5, cpu_linear.QUANTIZED_FEW_ROWS, 42):
                got = cpu_linear._quantized_linear(x[:rows], *operands, group)
                expected = F.linear(x[:rows].double(), dequantized)
                case = (n, k, group, rows, dtype)
                if rows > cpu_linear.QUANTIZED_FEW_ROWS:  # tiles of the dequantized weight
                    # int4 multiplies the activations rounded as its kernel rounds them
                    xr = cpu_linear.round_int4_activations(x[:rows].float(), group) if group else x[:rows]
                    expected = F.linear(xr.double(), dequantized)
                    if dtype == torch.bfloat16 and bf16_tiles:
                        # each weight and activation rounded to bf16 (half a step: 2^-9 of each),
                        # float32 sums, the output rounded to bf16
                        bound = 2**-8 * F.linear(xr.double().abs(), dequantized.abs()) + 2**-8 * expected.abs()
                        assert ((got.double() - expected).abs() <= bound).all(), case
                    else:
                        tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-4
                        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance,
                                                   msg=str(case))
                    continue
                if group:  # int8 activations: under a sixth of the error of the weights' own rounding,
                    # plus half a bf16 step of each output in bf16
                    own_rounding = F.linear(x[:rows].double(), dequantized - weight.double()).norm()
                    output_rounding = (expected * 2**-9).norm() if dtype == torch.bfloat16 else 0
                    assert (got.double() - expected).norm() <= 0.15 * own_rounding + output_rounding, case
                else:
                    tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-4
                    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance, msg=str(case))
                if kernel_isa == "avx512":
                    avx2 = _with_isa("avx2", lambda: cpu_linear._quantized_linear(x[:rows], *operands, group))
                    if not group:
                        assert torch.equal(got, avx2), case
                    elif dtype == torch.float32:
                        torch.testing.assert_close(got, avx2, rtol=1e-5, atol=1e-5, msg=str(case))
                    else:  # float32 sums that differ in their last bits may round to neighbouring bf16
                        torch.testing.assert_close(got, avx2, rtol=2**-7, atol=1e-3, msg=str(case))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("split", [512, 96])
def test_int8_product_split_at_blocks_is_the_whole_product(kernel_isa, split):
    """Row parallelism: each rank multiplies its columns of the rows (a multiple of 32; the stored
    values and row scales as they are) and the parts are summed in float32. The int8 kernel rounds
    each 32 columns of activations with a scale of their own, so the sum of the parts is the whole
    product up to float sums, though one part is 10^4 times larger than the other (with a scale
    for a rank's whole row, the whole product rounded the small part with the large one's step).
    Half the output rows have no weight on the large part, so that step would show in full."""
    from llama import quantize

    forced(kernel_isa, cpu_linear._quantized_isa(), "VNNI")
    n, k = 64, 1024
    g = torch.Generator().manual_seed(split)
    weight = torch.randn(n, k, generator=g) * 0.05
    weight[: n // 2, :split] = 0
    stored = quantize.quantize(weight, quantize.Scheme("int8"), torch.float32)
    x = torch.randn(5, k, generator=g)
    x[:, :split] *= 100
    x[:, split:] *= 0.01

    def product(rows: torch.Tensor, columns: slice) -> torch.Tensor:
        operands = quantize.kernel_operands(quantize.Scheme("int8"), stored["weight"][:, columns], stored["scales"],
                                            None, torch.float32)
        return cpu_linear._quantized_linear(rows[:, columns].contiguous(), *operands, 0)

    dequantized = quantize.dequantize(stored["weight"], stored["scales"], None)
    for rows in (x[:1], x):  # one pass over the weight for 1 row, two (4 + 1) for 5
        whole = product(rows, slice(None))
        parts = product(rows, slice(None, split)) + product(rows, slice(split, None))
        # float32 sums: a few units in the last place of the sum of the terms' magnitudes
        bound = 2**-20 * F.linear(rows.abs(), dequantized.abs())
        assert ((parts - whole).abs() <= bound).all(), ((parts - whole).abs() / bound).max()


def _with_isa(isa, product):
    """product() with TP_LLAMA_CPU_ISA=isa, the choice restored after."""
    previous = os.environ.get(cpu_linear.ISA_VARIABLE)
    os.environ[cpu_linear.ISA_VARIABLE] = isa
    cpu_linear._quantized_isa.cache_clear()
    try:
        return product()
    finally:
        os.environ[cpu_linear.ISA_VARIABLE] = previous
        cpu_linear._quantized_isa.cache_clear()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_memory_reads_every_line_once(threads):
    """The benchmark's bandwidth ceiling reads as the kernels do (each thread its own part): every
    whole 64-byte line exactly once, whatever the split (its XOR of the words says so)."""
    import numpy as np

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lines in (1, 3, 64, 1001):
            words = torch.randint(-2**62, 2**62, (lines * 8 + 3,), dtype=torch.int64)  # and a partial line
            expected = int(np.bitwise_xor.reduce(words[:lines * 8].numpy()).view(np.uint64))
            assert cpu_linear.read_memory(words) == expected
    finally:
        torch.set_num_threads(before)


def test_cpp_operators_call_the_same_kernels(kernel_isa):
    """cpu_ops.cpp's operators (what a decode step calls where a C++ compiler is found, as here)
    give what the ctypes calls of the same kernels give, bit for bit: every rows count the kernels
    take, bf16 and float32 activations, activations that are not contiguous, int8 and int4."""
    from llama import quantize

    forced(kernel_isa, cpu_linear._quantized_isa(), "VNNI")
    assert cpu_linear.has_torch_operators()
    isa = cpu_linear._quantized_isa()
    g = torch.Generator().manual_seed(3)
    for group, dtype in itertools.product([0, 32, 128], [torch.float32, torch.bfloat16]):
        scheme = quantize.Scheme("int4", group) if group else quantize.Scheme("int8")
        stored = quantize.quantize(torch.randn(77, 256, generator=g) * 0.05, scheme, dtype)
        operands = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"), dtype)
        x = torch.randn(cpu_linear.QUANTIZED_FEW_ROWS, 2, 256, generator=g).to(dtype)[:, 1]  # rows 512 apart
        for rows in (1, 2, 5, cpu_linear.QUANTIZED_FEW_ROWS):
            got = torch.ops.tp_llama.quantized_rows(x[:rows], *operands, group, isa)
            assert torch.equal(got, cpu_linear._quantized_linear(x[:rows], *operands, group)), (group, dtype, rows)
            rows_of_x = x[:rows]
            with RecordedOps() as ops:  # the model's products take the C++ operator, with the same result
                public = cpu_linear.quantized_linear(rows_of_x, *operands, group)
            assert ops.names == ["tp_llama.quantized_rows"] and torch.equal(public, got), ops.names
    bf16_isa = cpu_linear._bf16_isa()
    w = torch.randn(130, 300, generator=g).bfloat16()
    x = torch.randn(6, 2, 300, generator=g).bfloat16()[:, 0]
    for rows in (1, 3, 6):
        assert torch.equal(torch.ops.tp_llama.bf16_rows(x[:rows], w, bf16_isa), cpu_linear._bf16_kernel(x[:rows], w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpp_attention_operator_is_the_ctypes_call(dtype, kernel_isa):
    """The decode attention operator (cpu_ops.cpp's kernel) and the ctypes call, bit for bit, with
    int32 positions and a query that is not contiguous, as the wrapper's caller may pass them."""
    assert cpu_linear.has_torch_operators()
    forced(kernel_isa, cpu_linear._bf16_isa(), "avx512_bf16")
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(12, 2, 16, 64, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(2, 1, 8, 64, generator=g).to(dtype).transpose(1, 2)  # (batch, heads, 1, head_dim)
    tables = torch.tensor([[3, 7, 1], [0, 11, 5]])
    positions = torch.tensor([40, 17], dtype=torch.int32)
    got = cpu_linear.decode_attention(q, k, v, tables, positions)
    assert torch.equal(got, cpu_linear._decode_attention(q, k, v, tables, positions, cpu_linear._bf16_isa()))


def test_without_a_cpp_compiler_the_kernels_are_called_through_python(tmp_path):
    """Where cpu_ops.cpp does not build (here: a compiler that fails on C++ sources), rank 0 says so
    in one line and the kernels are still used, through the Python operators, compiled or not."""
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *.cpp) echo "no C++ here" >&2; exit 1;; esac; done\n'
                  'exec gcc "$@"\n')
    cc.chmod(0o755)
    check = """
import torch
from llama import cpu_linear
from llama.model import KVCache, paged_decode_attention
assert not cpu_linear.has_torch_operators() and cpu_linear.has_quantized_kernels()
x, w = torch.randn(1, 64).bfloat16(), torch.randn(48, 64).bfloat16()
assert torch.equal(torch.compile(cpu_linear.linear, fullgraph=True)(x, w), cpu_linear.linear(x, w))
cache = KVCache(4, 2, 16, 64, torch.bfloat16, torch.device("cpu"))
cache.k.normal_(), cache.v.normal_()
q, tables, positions = torch.randn(1, 4, 1, 64).bfloat16(), torch.tensor([[2, 0]]), torch.tensor([20])
eager = paged_decode_attention(q, cache, tables, positions)
assert torch.equal(torch.compile(paged_decode_attention, fullgraph=True)(q, cache, tables, positions), eager)
print("ok")
"""
    env = {**os.environ, "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: cpu_ops.cpp not built (") \
        and "no C++ here" in warnings[0] and "through Python instead" in warnings[0], result.stderr[-3000:]
