/* cpu_linear.c's kernels as torch operators with C++ kernels: tp_llama::bf16_rows,
 * tp_llama::quantized_rows and tp_llama::decode_attention (their schemas and fake kernels are in
 * cpu_linear.py). Built into the same library as cpu_linear.c, against torch's stable C++ ABI
 * (header-only, so it compiles in about as long as cpu_linear.c does), when a C++ compiler is found.
 *
 * Why: a compiled decode step makes about 80 of these calls (llama3.2-1b), and through a Python
 * kernel each goes from the dispatcher back into Python, then through ctypes, with the caches
 * cold from streaming the product before's weights: without these a step takes 2-3.5% longer
 * (the README's figures: tools/decode_step_profile.py --ab_python_operators). */
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {
int bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, int64_t N, uint16_t *y,
                int threads, int isa);
int quantized_linear(const void *x, int64_t M, int64_t K, int bf16, const void *w, int64_t ldw, const void *scales,
                     int sbf16, int64_t group, int64_t N, void *y, int threads, int isa);
int decode_attention(const void *q, int qbf16, const void *k, const void *v, int cbf16, int64_t B, int64_t H,
                     int64_t KVH, int64_t BS, int64_t D, const int64_t *positions, const int64_t *tables, int64_t W,
                     float scale, void *out, int threads, int isa);

/* Whether this library holds the operators (cpu_linear.py asks through ctypes). */
int has_torch_operators(void) { return 1; }
}

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

bool is_bf16(const Tensor &t) { return t.scalar_type() == ScalarType::BFloat16; }

int threads() { return static_cast<int>(torch::stable::get_num_threads()); }

/* x's rows (a contiguous copy if they are not one after the other) and their count. */
Tensor rows_of(const Tensor &x, int64_t k, int64_t *rows) {
  *rows = x.numel() / k;
  return x.is_contiguous() ? x : torch::stable::contiguous(x);
}

/* An output of x's leading dimensions and n features, in x's dtype. */
Tensor output(const Tensor &x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return torch::stable::new_empty(x, shape);
}

/* x @ weight.T, x and weight bfloat16 (weight rows contiguous), by the kernels of `isa`. */
Tensor bf16_rows(Tensor x, Tensor weight, int64_t isa) {
  int64_t n = weight.size(0), k = weight.size(1), rows;
  STD_TORCH_CHECK(is_bf16(x) && is_bf16(weight) && weight.stride(1) == 1, "bf16_rows: bfloat16 operands");
  Tensor xs = rows_of(x, k, &rows), y = output(x, n);
  int status = bf16_linear(static_cast<const uint16_t *>(xs.data_ptr()), rows, k,
                           static_cast<const uint16_t *>(weight.data_ptr()), weight.stride(0), n,
                           static_cast<uint16_t *>(y.data_ptr()), threads(), static_cast<int>(isa));
  STD_TORCH_CHECK(status == 0, "bf16_rows: out of memory for ", rows, " x ", k, " float32 activations");
  return y;
}

#if defined(__AVX2__)
/* x @ dequantized(weight).T (cpu_linear.quantized_linear's operands), x bfloat16 or float32. */
Tensor quantized_rows(Tensor x, Tensor weight, Tensor scales, int64_t group_size, int64_t isa) {
  int64_t n = weight.size(0), k = weight.size(1) * (group_size ? 2 : 1), rows;
  STD_TORCH_CHECK(is_bf16(x) || x.scalar_type() == ScalarType::Float, "quantized_rows: bfloat16 or float32 x");
  Tensor xs = rows_of(x, k, &rows), y = output(x, n);
  int status = quantized_linear(xs.data_ptr(), rows, k, is_bf16(x), weight.data_ptr(), weight.stride(0),
                                scales.data_ptr(), is_bf16(scales), group_size, n, y.data_ptr(), threads(),
                                static_cast<int>(isa));
  STD_TORCH_CHECK(status == 0, "quantized_rows: out of memory for ", rows, " x ", k, " activations");
  return y;
}
#endif

/* cpu_linear.decode_attention's operator: q contiguous, block_tables and positions int64 and
 * contiguous (the caller's conversions). */
Tensor decode_attention_op(Tensor q, Tensor k, Tensor v, Tensor block_tables, Tensor positions, int64_t isa) {
  STD_TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && block_tables.is_contiguous() &&
                      positions.is_contiguous() && block_tables.scalar_type() == ScalarType::Long &&
                      positions.scalar_type() == ScalarType::Long,
                  "decode_attention: contiguous operands, int64 block tables and positions");
  int64_t head_dim = q.size(3);
  Tensor out = torch::stable::empty_like(q);
  int status = decode_attention(q.data_ptr(), is_bf16(q), k.data_ptr(), v.data_ptr(), is_bf16(k), q.size(0), q.size(1),
                                k.size(1), k.size(2), head_dim, static_cast<const int64_t *>(positions.data_ptr()),
                                static_cast<const int64_t *>(block_tables.data_ptr()), block_tables.size(1),
                                static_cast<float>(std::pow(static_cast<double>(head_dim), -0.5)), out.data_ptr(), threads(),
                                static_cast<int>(isa));
  STD_TORCH_CHECK(status == 0, "decode_attention: out of memory for the scores");
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tp_llama, CPU, m) {
  m.impl("bf16_rows", TORCH_BOX(&bf16_rows));
#if defined(__AVX2__)
  m.impl("quantized_rows", TORCH_BOX(&quantized_rows));
#endif
  m.impl("decode_attention", TORCH_BOX(&decode_attention_op));
}
