"""The linear layers' matrix products, chosen by what the CPU computes natively.

The CPU default dtype is bf16 (half the bytes a decode step reads) and was chosen on a CPU
with native bf16 (AVX512-BF16 / AMX, which oneDNN uses). Without it (AVX2-only x86: many
cloud and laptop CPUs; AVX-512 without BF16), torch multiplies bf16 with its own generic
kernels: measured on an AVX2-only AMD EPYC (Zen 3, 2 threads), a 128x2048 by 2048x8192
product runs at 20 GFLOP/s in bf16 and 77 with float32 weights, so a 128-token prefill of the
llama3.2-1b shape took 12 s. On such CPUs, with the weights kept in bf16:

- products of many rows (prefill, large batches) are float32 GEMMs on the weight, upcast a
  block of rows at a time into a buffer that stays in cache: 100 GFLOP/s on that product
  (upcasting the whole weight first costs a full extra pass over memory: 45);
- products of a few rows (decode) go through cpu_linear.c, which reads the bf16 weight once,
  as fast as a plain read of memory, and accumulates in float32 (torch's bf16 kernels: 72-86%
  of a plain read for one row, 3-4x slower for 4 to 8).

Everywhere else (native bf16, GPUs, float32 or float16 weights) F.linear as before. Outputs
are rounded to the activations' dtype once, as torch's bf16 kernels round them.

Weight-only int8 and int4 weights (llama.quantize) on x86 CPUs with AVX2, where cpu_linear.c
builds: few rows through its quantized kernels, which read the stored layout as it is and
multiply integers (int8 weights by the activations rounded to 16 bits per 32 columns, int4 by 8
bits per group of columns, in every path; torch's own CPU kernels for these are compute bound on AVX2 at 4-5 G weights/s a
core: no faster than streaming bf16); many rows as float32 GEMMs on dequantized blocks of rows,
as above.

Each of these kernels has AVX-512 versions in the same build (bf16 with avx512_bf16, int8 and int4
with VNNI), chosen at run time from what the CPU has; TP_LLAMA_CPU_ISA=avx2 keeps the AVX2 ones.
Where torch has native bf16, products of up to NATIVE_FEW_ROWS rows by bf16 weights go through the
avx512_bf16 kernel too (faster than ATen's and oneDNN's for so few rows), and int8/int4 products
of many rows multiply bf16 tiles of the dequantized weight instead of float32 ones.

The same library holds the decode step's attention on CPU (decode_attention, any CPU where it
builds): each sequence's query against its cached keys and values up to its position, found
through its block table and read once as stored, where torch's version converts the whole cache
to float32 and multiplies every position under a mask (0.08 against 0.28-0.39 ms a layer at a 256-token cache, AVX2 EPYC).
With avx512_bf16 and bfloat16 heads of 64 or 128 it takes an AVX-512 path (about half the time).

Where a C++ compiler builds cpu_ops.cpp into the same library, the kernels are called as torch
operators with C++ kernels (has_torch_operators), eager and compiled, else through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from llama import native
from llama.errors import UserError

_SOURCE = Path(__file__).with_name("cpu_linear.c")
_OPERATORS = Path(__file__).with_name("cpu_ops.cpp")
# At most this many rows go through cpu_linear.c, more are a float32 GEMM. The kernel reads
# the weight from memory once (further groups of 6 rows find a block of it in cache); MKL's
# GEMM is slow for so few rows. Measured on 2048 x 8192 bf16 weights, 2 threads: 5.4 vs 2.7
# GB/s at 16 rows, 2.9 vs 2.2 at 32, equal at 48-64; prefill's hundreds of rows want the GEMM.
FEW_ROWS = 32
# The same for int8/int4 weights (cpu_linear.c's quantized kernels take 4 rows a pass).
QUANTIZED_FEW_ROWS = 16
# cpu_linear.c's int4 kernel takes rows of whole 64-column blocks (narrower local rows, as a
# small model's split over many ranks can leave, multiply dequantized blocks instead).
INT4_KERNEL_COLUMNS = 64
# ... and its int8 kernel rows of whole 32-column blocks (each block's activations have their own
# scale; no model's layer is narrower).
INT8_KERNEL_COLUMNS = 32
# Bytes of the float32 block of weight rows that a GEMM multiplies at a time.
BLOCK_BYTES = 4 << 20
# Where torch multiplies bf16 natively, at most this many rows (one pass over the weight) go
# through cpu_linear.c's avx512_bf16 kernel, more through oneDNN. Measured with the weight in L2
# (AMD EPYC Zen 4, 1 thread, fastest of 21 alternations): 42 against ATen's 21 GB/s for one row
# (batch-1 decode bypasses oneDNN: llama.generation.single_row_kernels), against oneDNN 31 vs 13
# at 2 rows, 12 vs 10 at 6, 9.4 vs 9.8 at 8.
NATIVE_FEW_ROWS = 6
# cpu_linear.c's instruction sets (its ISA_* values), and the switch that caps them.
ISA_AVX2, ISA_AVX512 = 0, 1
ISA_VARIABLE = "TP_LLAMA_CPU_ISA"


def _native_bf16() -> bool:
    """Whether torch multiplies bf16 natively here: an x86 CPU with AVX512-BF16 or AMX,
    unless ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA hold torch below them (which is how an
    AVX2-only CPU is emulated on a newer one). Other architectures keep torch's kernels."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if isa not in ("ALL", "DEFAULT") and not any(name in isa for name in ("BF16", "AMX", "AVX10")):
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# Decided once (a constant to torch.compile).
NATIVE_BF16 = _native_bf16()


def uses_fp32_products(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not NATIVE_BF16


def _allowed_isa() -> int:
    """The widest instruction set TP_LLAMA_CPU_ISA lets cpu_linear.c's kernels use: `avx2`
    (today's kernels, also how an AVX2-only CPU is emulated, with ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2) or `avx512` (the default: what the CPU has)."""
    value = os.environ.get(ISA_VARIABLE, "avx512").lower()
    if value not in ("avx2", "avx512"):
        raise UserError(f"{ISA_VARIABLE}={value}: use avx2 or avx512 (or leave it unset: the widest the CPU has)")
    return ISA_AVX512 if value == "avx512" else ISA_AVX2


@torch.compiler.assume_constant_result  # a constant to torch.compile
def bf16_isa() -> int:
    """The instruction set of cpu_linear.c's bf16 kernel here: AVX-512 with avx512_bf16 where the
    CPU has it (and the library's compiler built it), else AVX2."""
    return _bf16_isa()


def _avx512_isa(feature: str) -> int:
    """ISA_AVX512 where the library built its AVX-512 kernels, TP_LLAMA_CPU_ISA allows them and
    the CPU has AVX-512 F/BW/VL/DQ and `feature`, else ISA_AVX2."""
    allowed = _allowed_isa()  # first, so that a bad value is reported whatever else holds
    lib = _library()
    has = torch.cpu.get_capabilities()
    if (allowed == ISA_AVX512 and lib is not None and lib.has_avx512_kernels()
            and all(has.get(f"avx512_{name}", False) for name in ("f", "bw", "vl", "dq", feature))):
        return ISA_AVX512
    return ISA_AVX2


@functools.cache
def _bf16_isa() -> int:
    return _avx512_isa("bf16")


@torch.compiler.assume_constant_result  # a constant to torch.compile
def quantized_isa() -> int:
    return _quantized_isa()


@functools.cache
def _quantized_isa() -> int:
    """The instruction set of the int8/int4 kernels: AVX-512 with VNNI where the CPU has it."""
    return _avx512_isa("vnni")


def _native_bf16_tiles() -> bool:
    """Whether products of many rows by int8/int4 weights multiply bf16 tiles of the dequantized
    weight (oneDNN's native bf16 GEMM) instead of float32 ones: where torch has native bf16 and
    TP_LLAMA_CPU_ISA allows AVX-512."""
    return NATIVE_BF16 and _bf16_isa() == ISA_AVX512


def uses_bf16_kernel(weight: torch.Tensor) -> bool:
    """Whether bf16 products of this weight go through _bf16_linear (else F.linear)."""
    return uses_fp32_products(weight) or (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                                          and bf16_isa() == ISA_AVX512)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, the product of every linear layer of the model: the one place that
    chooses how (see the module's docstring)."""
    # The products take x as one matrix of rows. A decode step's attention output, (batch, 1,
    # dim), has an odd stride on its length-1 dimension, and torch's matmul does not fold such
    # an input into one product: it multiplies a batch of matrices by copies of the weight, one
    # per row (measured: a compiled 8-row decode step of llama3.2-1b, 1 thread, 3.2 s, not 0.24).
    rows = x.reshape(-1, x.shape[-1])
    if not uses_bf16_kernel(weight):
        y = F.linear(rows, weight)
    elif _bf16_kernel_takes(rows, weight) and has_torch_operators():
        y = torch.ops.tp_llama.bf16_rows(rows, weight, bf16_isa())
    elif torch.compiler.is_compiling():
        y = torch.ops.tp_llama.bf16_linear(rows, weight)
    else:
        y = _bf16_linear(rows, weight)  # eager: skip the dispatcher
    return y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, operators=True)
    if lib is not None and not hasattr(lib, "has_torch_operators"):  # cpu_ops.cpp did not build
        _OPS.impl("decode_attention", _decode_attention, "CPU")
    return lib


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# The library's functions and their arguments (all return int but read_memory).
_SIGNATURES = {
    "bf16_linear": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _int, _int],
    "quantized_linear": [_ptr, _i64, _i64, _int, _ptr, _i64, _ptr, _int, _i64, _i64, _ptr, _int, _int],
    "dequantize_rows": [_ptr, _i64, _ptr, _int, _i64, _i64, _i64, _i64, _ptr, _int, _int, _int],
    "int8_order": [_i64, _ptr],
    "read_memory": [_ptr, _i64, _int],
    "decode_attention": [_ptr, _int, _ptr, _ptr, _int, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_float,
                         _ptr, _int, _int],
}


def load_library(source: Path, operators: bool = False) -> ctypes.CDLL | None:
    """`source` (this cpu_linear.c, or another revision's for an A/B: tools/cpu_kernels_revisions_ab.py)
    built for this CPU and loaded, its functions declared (those an older revision has); with
    `operators`, built together with cpu_ops.cpp (tp_llama's C++ operators, registered as it
    loads) where a C++ compiler builds it, else alone."""
    flags = ["-fopenmp"]  # resolves to the OpenMP runtime torch has loaded (the same soname)
    if platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx2_supported():
        flags += ["-mavx2", "-mfma"]
    lib = None
    if operators and native.has_compiler():
        torch_dir = Path(torch.__file__).parent
        major, minor = (int(part) for part in torch.__version__.split(".")[:2])
        # torch's stable ABI, at this torch's version (which also keys the cached library)
        cxx = [f"-I{torch_dir / 'include'}", f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"]
        link = (f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-ltorch_cpu", "-lstdc++")
        lib = native.build(_OPERATORS, (*flags, *cxx), also=(source,), link=link,
                           instead="its kernels are called through Python instead (decode steps a few percent "
                                   "slower; a C++ compiler, such as g++, builds it)")
    if lib is None:
        lib = native.build(source, tuple(flags))
    if lib is not None:
        for name, argtypes in _SIGNATURES.items():
            if hasattr(lib, name):
                getattr(lib, name).argtypes = argtypes
        lib.read_memory.restype = ctypes.c_uint64
    return lib


def _bf16_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T goes through the bf16 kernel (where the library built)."""
    few = NATIVE_FEW_ROWS if NATIVE_BF16 else FEW_ROWS
    return x.numel() // weight.shape[1] <= few and x.dtype == torch.bfloat16 and weight.stride(1) == 1


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    rows = x.numel() // k
    if _bf16_kernel_takes(x, weight) and _library() is not None:
        return _bf16_kernel(x, weight)
    if NATIVE_BF16:
        return F.linear(x, weight)
    y = _blocked_gemm(x.reshape(rows, k).to(torch.float32), n, k,
                      lambda block, start, stop: block.copy_(weight[start:stop]))
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _bf16_kernel(x: torch.Tensor, weight: torch.Tensor, isa: int | None = None) -> torch.Tensor:
    """x @ weight.T by cpu_linear.c's bf16 kernel of `isa` (default: the one _bf16_isa() chose)."""
    n, k = weight.shape
    rows = x.numel() // k
    if not x.is_contiguous():  # rows of k, one after the other
        x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], n))
    if _library().bf16_linear(x.data_ptr(), rows, k, weight.data_ptr(), weight.stride(0), n, y.data_ptr(),
                              torch.get_num_threads(), _bf16_isa() if isa is None else isa) != 0:
        raise MemoryError(f"{rows} x {k} float32 activations")
    return y


def _blocked_gemm(x: torch.Tensor, n: int, k: int, fill: Callable[[torch.Tensor, int, int], None]) -> torch.Tensor:
    """x @ w.T, where fill(block, start, stop) writes rows [start, stop) of w in x's dtype
    (float32, or bf16 where torch multiplies it natively)."""
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    step = max(1, BLOCK_BYTES // (4 * k))
    block = torch.empty(min(step, n), k, dtype=x.dtype)
    for start in range(0, n, step):
        rows = block[:min(step, n - start)]
        fill(rows, start, start + rows.shape[0])
        torch.mm(x, rows.t(), out=y[:, start:start + step])
    return y


@torch.compiler.assume_constant_result  # a constant to torch.compile
def has_torch_operators() -> bool:
    """Whether cpu_ops.cpp built: the kernels are then called as operators with C++ kernels
    (tp_llama::bf16_rows, quantized_rows, decode_attention), eager and compiled, else through
    ctypes (compiled: from Python kernels of tp_llama::bf16_linear, quantized_linear and
    decode_attention)."""
    return _has_torch_operators()


@functools.cache
def _has_torch_operators() -> bool:
    lib = _library()
    return lib is not None and hasattr(lib, "has_torch_operators")


@torch.compiler.assume_constant_result  # a constant to torch.compile
def has_quantized_kernels() -> bool:
    """Whether int8/int4 weights on this CPU use cpu_linear.c (else torch's kernels); decides
    their operands' layout (llama.quantize.kernel_operands)."""
    return _has_quantized_kernels()


@functools.cache  # every quantized product asks: once per process, not a ctypes call each time
def _has_quantized_kernels() -> bool:
    lib = _library()
    return lib is not None and lib.has_quantized_kernels() == 1


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ dequantized(weight).T for llama.quantize's stored layout: weight int8 (n, k) with
    scales (n,) (group_size 0), or int4 bytes (n, k / 2) with (scale, zero) pairs (n,
    k / group_size, 2); scales bfloat16 or float32. Output in x's dtype."""
    k = weight.shape[1] * (2 if group_size else 1)
    if _quantized_kernel_takes(x, k, group_size) and x.dtype in (torch.bfloat16, torch.float32) \
            and has_torch_operators():
        return torch.ops.tp_llama.quantized_rows(x, weight, scales, group_size, quantized_isa())
    if torch.compiler.is_compiling():
        return torch.ops.tp_llama.quantized_linear(x, weight, scales, group_size)
    return _quantized_linear(x, weight, scales, group_size)


def _quantized_kernel_takes(x: torch.Tensor, k: int, group_size: int) -> bool:
    """Whether x's rows of k go through the int8/int4 kernels (else a GEMM of dequantized tiles)."""
    return x.numel() // k <= QUANTIZED_FEW_ROWS and k % (INT4_KERNEL_COLUMNS if group_size else INT8_KERNEL_COLUMNS) == 0


def _quantized_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int,
                      isa: int | None = None) -> torch.Tensor:
    """quantized_linear, with the kernels of `isa` (default: the ones _quantized_isa() chose; AVX2
    also keeps float32 tiles for many rows)."""
    isa = _quantized_isa() if isa is None else isa
    n = weight.shape[0]
    k = weight.shape[1] * (2 if group_size else 1)
    rows = x.numel() // k
    lib = _library()
    threads = torch.get_num_threads()
    scales_bf16 = scales.dtype == torch.bfloat16
    if not _quantized_kernel_takes(x, k, group_size):
        def fill(block: torch.Tensor, start: int, stop: int) -> None:
            if lib.dequantize_rows(weight.data_ptr(), weight.stride(0), scales.data_ptr(), scales_bf16, group_size,
                                   k, start, stop, block.data_ptr(), block.dtype == torch.bfloat16, threads,
                                   _bf16_isa()) != 0:
                raise MemoryError(f"a row of {k} float32 weights")
        x32 = x.reshape(rows, k).to(torch.float32)
        # int4 rounds the activations as its kernel does; int8's weight columns are in int8_order
        x32 = round_int4_activations(x32, group_size) if group_size else x32.index_select(1, int8_order(k))
        # Prefill multiplies bf16 tiles where torch multiplies bf16 natively (TP_LLAMA_CPU_ISA=avx2
        # keeps float32 ones); a few rows of a width the int4 kernel does not take keep float32,
        # the kernel's result up to float sums.
        bf16_tiles = x.dtype == torch.bfloat16 and rows > QUANTIZED_FEW_ROWS and _native_bf16_tiles() and isa == ISA_AVX512
        y = _blocked_gemm(x32.to(torch.bfloat16) if bf16_tiles else x32, n, k, fill)
        return y.to(x.dtype).view(*x.shape[:-1], n)
    compute = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
    compute = compute.contiguous()
    y = compute.new_empty((*x.shape[:-1], n))
    if lib.quantized_linear(compute.data_ptr(), rows, k, compute.dtype == torch.bfloat16, weight.data_ptr(),
                            weight.stride(0), scales.data_ptr(), scales_bf16, group_size, n, y.data_ptr(),
                            threads, isa) != 0:
        raise MemoryError(f"{rows} x {k} float32 activations")
    return y if y.dtype == x.dtype else y.to(x.dtype)  # a no-op .to costs 2-3 us a call, 1% of a decode step


@functools.cache
def int8_order(k: int) -> torch.Tensor:
    """The column order of int8 weights for cpu_linear.c's kernels: position p of a row of k holds
    column order[p]. Columns are regrouped within units of 32-column blocks so that each vector
    lane meets one block, whose activations have a scale of their own (cpu_linear.c says why).
    Shared: read, never write."""
    order = torch.empty(k, dtype=torch.int64)
    _library().int8_order(k, order.data_ptr())
    return order


def round_int4_activations(x32: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 rows (rows, k) as cpu_linear.c's int4 kernel takes them: each group of
    `group_size` columns rounded to 8-bit integers times its own scale (its largest magnitude /
    127), products rounded as the kernel rounds them. The kernel's GEMM fallbacks multiply these,
    so every path, batch and TP degree gives a token the same result up to float sums."""
    groups = x32.view(x32.shape[0], -1, group_size)
    amax = groups.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, 1.0)
    return (torch.round(groups * (1 / scale)) * scale).view_as(x32)


def read_memory(t: torch.Tensor) -> int | None:
    """Reads t's bytes (contiguous, on CPU; whole 64-byte lines) as the kernels stream their
    weights, every thread its own contiguous part, prefetched; returns the XOR of its 64-bit
    words, or None (nothing read) where cpu_linear.c did not build."""
    lib = _library()
    if lib is None:
        return None
    return lib.read_memory(t.data_ptr(), t.numel() * t.element_size() // 64 * 64, torch.get_num_threads())


@torch.compiler.assume_constant_result  # a constant to torch.compile
def has_decode_attention() -> bool:
    """Whether cpu_linear.c built here (its decode attention needs no particular CPU)."""
    return _library() is not None


def decode_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether decode_attention takes these operands (else llama.model's torch version runs)."""
    dtypes = (torch.bfloat16, torch.float32)
    return (q.device.type == "cpu" and q.dtype in dtypes and k.dtype in dtypes and v.dtype == k.dtype
            and q.shape[-1] % 8 == 0 and k.is_contiguous() and v.is_contiguous() and has_decode_attention())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """llama.model.paged_decode_attention through cpu_linear.c: q (batch, heads, 1, head_dim) against
    the cache blocks k, v (blocks, kv_heads, block_size, head_dim), keys 0..positions[b] of sequence
    b in the blocks block_tables[b] (batch, width)."""
    if has_torch_operators():  # the operands as the C++ kernel takes them
        return torch.ops.tp_llama.decode_attention(q.contiguous(), k, v, block_tables.to(torch.int64).contiguous(),
                                                   positions.reshape(q.shape[0]).to(torch.int64).contiguous(),
                                                   bf16_isa())
    if torch.compiler.is_compiling():
        return torch.ops.tp_llama.decode_attention(q, k, v, block_tables, positions, bf16_isa())
    return _decode_attention(q, k, v, block_tables, positions, _bf16_isa())


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor,
                      positions: torch.Tensor, isa: int) -> torch.Tensor:
    bsz, n_heads, _, head_dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    positions = positions.reshape(bsz).to(torch.int64).contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    if _library().decode_attention(q.data_ptr(), q.dtype == torch.bfloat16, k.data_ptr(), v.data_ptr(),
                                   k.dtype == torch.bfloat16, bsz, n_heads, k.shape[1], k.shape[2], head_dim,
                                   positions.data_ptr(), tables.data_ptr(), tables.shape[1], head_dim**-0.5,
                                   out.data_ptr(), torch.get_num_threads(), isa) != 0:
        raise MemoryError(f"attention scores of {int(positions.max()) + 1} positions")
    return out


# The operators a compiled graph calls (registered like llama.shm_collectives' operators).
_OPS = torch.library.Library("tp_llama", "FRAGMENT")
_OPS.define("bf16_linear(Tensor x, Tensor weight) -> Tensor")
_OPS.impl("bf16_linear", _bf16_linear, "CPU")


@torch.library.register_fake("tp_llama::bf16_linear")
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Its kernel: cpu_ops.cpp's, or where that did not build the Python one, registered by _library.
_OPS.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor block_tables, Tensor positions, int isa) -> Tensor")


@torch.library.register_fake("tp_llama::decode_attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor,
      positions: torch.Tensor, isa: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_OPS.define("quantized_linear(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor")
_OPS.impl("quantized_linear", _quantized_linear, "CPU")


@torch.library.register_fake("tp_llama::quantized_linear")
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# cpu_ops.cpp's operators (their C++ kernels registered as the library loads): the kernels' own
# cases only (few rows, whole blocks), where the operators above take every case.
_OPS.define("bf16_rows(Tensor x, Tensor weight, int isa) -> Tensor")
_OPS.define("quantized_rows(Tensor x, Tensor weight, Tensor scales, int group_size, int isa) -> Tensor")


@torch.library.register_fake("tp_llama::bf16_rows")
def _(x: torch.Tensor, weight: torch.Tensor, isa: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("tp_llama::quantized_rows")
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int, isa: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
