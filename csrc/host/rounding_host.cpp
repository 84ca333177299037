// The rounding helpers of csrc/rounding.h on arrays, for the tests of their
// bit-exactness claims (tests/ext/test_rounding.py): the functors use the
// same inline functions.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../bindings_common.h"
#include "../rounding.h"

namespace py = pybind11;

namespace fastmup {
namespace host {
namespace {

// dst[i] = the 16-bit pattern of src[i] stochastically rounded with r[i].
void stochastic_round(int code, uint64_t src, uint64_t r, uint64_t dst, int64_t n) {
  const float* x = address<const float>(src);
  const int32_t* bits = address<const int32_t>(r);
  uint16_t* out = address<uint16_t>(dst);
  if (code != kBFloat16 && code != kFloat16) throw std::invalid_argument("stochastic_round: dtype code must be bf16 or fp16");
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t ri = static_cast<uint32_t>(bits[i]);
    out[i] = code == kBFloat16 ? stochastic_bf16(x[i], ri) : stochastic_fp16(x[i], ri);
  }
}

// dst[i] = the 16 random bits of element start + i of tensor `tensor_id` at `step`.
void rounding_bits(uint32_t seed_prefix, uint32_t step, uint32_t tensor_id, int64_t start, uint64_t dst, int64_t n) {
  int32_t* out = address<int32_t>(dst);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t e = static_cast<uint64_t>(start + i);
    const RoundingKey k = RoundingKey::of(seed_prefix, step, tensor_id, static_cast<uint32_t>(e >> 32));
    out[i] = static_cast<int32_t>(k.bits(static_cast<uint32_t>(e)));
  }
}

// The CUDA kernels' rounding of one block-map entry (multi_tensor.cuh:
// store_param_pack, scalar_loop) on n <= 2^17 fp32 values of a tensor from
// element `start` (a multiple of a power of two >= n): packs of N elements
// (stochastic_pack) from the entry's head, then the rest as pairs and a last
// single (stochastic_pair), the forms of the kernels' tails.
template <class P, int N>
void pack_run(const float* x, uint16_t* out, int64_t n, const RoundingKey& key, uint32_t start_lo) {
  const uint32_t head = key.head(start_lo >> 1);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    float v[N];
    for (int q = 0; q < N; ++q) v[q] = x[i + q];
    uint32_t w[N / 2];
    stochastic_pack<P, N>(v, head, static_cast<uint32_t>(i) >> 1, w);
    for (int q = 0; q < N; ++q) out[i + q] = static_cast<uint16_t>(w[q / 2] >> (16 * (q % 2)));
  }
  for (; i + 1 < n; i += 2) {
    const uint32_t w = stochastic_pair<P>(x[i], x[i + 1], RoundingKey::word(head, static_cast<uint32_t>(i) >> 1));
    out[i] = static_cast<uint16_t>(w);
    out[i + 1] = static_cast<uint16_t>(w >> 16);
  }
  if (i < n) out[i] = static_cast<uint16_t>(stochastic_pair<P>(x[i], x[i], RoundingKey::word(head, static_cast<uint32_t>(i) >> 1)));
}

template <class P>
void pack_run_of(int pack, const float* x, uint16_t* out, int64_t n, const RoundingKey& key, uint32_t start_lo) {
  switch (pack) {
    case 2: return pack_run<P, 2>(x, out, n, key, start_lo);
    case 4: return pack_run<P, 4>(x, out, n, key, start_lo);
    case 8: return pack_run<P, 8>(x, out, n, key, start_lo);
    default: throw std::invalid_argument("stochastic_packs: pack must be 2, 4 or 8");
  }
}

void stochastic_packs(int code, int pack, uint32_t seed_prefix, uint32_t step, uint32_t tensor_id, int64_t start, uint64_t src,
                      uint64_t dst, int64_t n) {
  if (code != kBFloat16 && code != kFloat16) throw std::invalid_argument("stochastic_packs: dtype code must be bf16 or fp16");
  if (n < 0 || n > (int64_t(1) << 17) || start < 0) throw std::invalid_argument("stochastic_packs: n in [0, 2^17], start >= 0");
  int64_t block = 2;
  while (block < n) block *= 2;
  if (start % block != 0) throw std::invalid_argument("stochastic_packs: start must be a multiple of a power of two >= n");
  const float* x = address<const float>(src);
  uint16_t* out = address<uint16_t>(dst);
  const uint64_t e0 = static_cast<uint64_t>(start);
  const RoundingKey key = RoundingKey::of(seed_prefix, step, tensor_id, static_cast<uint32_t>(e0 >> 32));
  py::gil_scoped_release release;
  if (code == kBFloat16) pack_run_of<Bf16>(pack, x, out, n, key, static_cast<uint32_t>(e0));
  else pack_run_of<Fp16>(pack, x, out, n, key, static_cast<uint32_t>(e0));
}

// The cheap form of each pair (x[2k], x[2k + 1]) with hash word w[k] and
// whether its check passes (rounding.h: PairRounding's cheap and exact).
void cheap_pairs(int code, uint64_t src, uint64_t words, uint64_t dst, uint64_t exact, int64_t npairs) {
  if (code != kBFloat16 && code != kFloat16) throw std::invalid_argument("cheap_pairs: dtype code must be bf16 or fp16");
  const float* x = address<const float>(src);
  const int32_t* w = address<const int32_t>(words);
  int32_t* out = address<int32_t>(dst);
  uint8_t* ok = address<uint8_t>(exact);
  py::gil_scoped_release release;
  for (int64_t k = 0; k < npairs; ++k) {
    const uint32_t wk = static_cast<uint32_t>(w[k]);
    const float x0 = x[2 * k], x1 = x[2 * k + 1];
    uint32_t h;
    bool e;
    if (code == kBFloat16) {
      h = PairRounding<Bf16>::cheap(x0, x1, wk);
      e = PairRounding<Bf16>::exact(x0, x1, h);
    } else {
      h = PairRounding<Fp16>::cheap(x0, x1, wk);
      e = PairRounding<Fp16>::exact(x0, x1, h);
    }
    out[k] = static_cast<int32_t>(h);
    ok[k] = e;
  }
}

void encode(uint64_t src, uint64_t param, uint64_t rem, int64_t n) {
  const float* x = address<const float>(src);
  uint16_t* b = address<uint16_t>(param);
  int16_t* r = address<int16_t>(rem);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) encode_remainder(x[i], b[i], r[i]);
}

void decode(uint64_t param, uint64_t rem, uint64_t dst, int64_t n) {
  const uint16_t* b = address<const uint16_t>(param);
  const int16_t* r = address<const int16_t>(rem);
  float* out = address<float>(dst);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) out[i] = decode_remainder(b[i], r[i]);
}

// Every one of the 2^32 fp32 patterns through the remainder split:
// (patterns that do not round-trip, finite patterns whose parameter is not
// the nearest bf16 with ties away from zero, quiet NaNs whose parameter is
// not a NaN, NaNs whose parameter is not a NaN).
py::tuple remainder_exhaustive() {
  uint64_t not_exact = 0, not_nearest = 0, quiet_not_nan = 0, nan_not_nan = 0;
  {
    py::gil_scoped_release release;
    for (uint64_t v = 0; v < (uint64_t(1) << 32); ++v) {
      const uint32_t u = static_cast<uint32_t>(v);
      uint16_t b;
      int16_t r;
      encode_remainder(bits_float(u), b, r);
      not_exact += float_bits(decode_remainder(b, r)) != u;
      const uint32_t a = u & 0x7fffffffu;
      const bool b_nan = (b & 0x7fffu) > 0x7f80u;
      if (a > 0x7f800000u) {
        nan_not_nan += !b_nan;
        quiet_not_nan += ((u >> 22) & 1u) && !b_nan;
      } else {
        const uint32_t lo = u & 0xffffu;
        const uint32_t nearest = (u >> 16) + (lo >= 0x8000u);  // magnitude rounding, ties away
        not_nearest += b != static_cast<uint16_t>(nearest);
      }
    }
  }
  return py::make_tuple(not_exact, not_nearest, quiet_not_nan, nan_not_nan);
}

}  // namespace

void register_rounding(py::module_& m) {
  m.def("stochastic_round", &stochastic_round, py::arg("code"), py::arg("src"), py::arg("r"), py::arg("dst"), py::arg("n"),
        "n fp32 values stochastically rounded to storage dtype `code` (bf16, fp16) with 16-bit r (int32).");
  m.def("rounding_bits", &rounding_bits, py::arg("seed_prefix"), py::arg("step"), py::arg("tensor_id"), py::arg("start"),
        py::arg("dst"), py::arg("n"), "The stochastic-rounding bits of n elements (int32 out).");
  m.def("stochastic_packs", &stochastic_packs, py::arg("code"), py::arg("pack"), py::arg("seed_prefix"), py::arg("step"),
        py::arg("tensor_id"), py::arg("start"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "n fp32 values of elements start... rounded as the CUDA kernels do: packs of `pack` elements, then pairs.");
  m.def("cheap_pairs", &cheap_pairs, py::arg("code"), py::arg("src"), py::arg("words"), py::arg("dst"), py::arg("exact"),
        py::arg("npairs"), "The cheap rounding of each pair with its hash word (int32 out) and whether its check passes (uint8).");
  m.def("encode_remainder", &encode, py::arg("src"), py::arg("param"), py::arg("rem"), py::arg("n"),
        "fp32 -> (bf16 bits, int16 remainder).");
  m.def("decode_remainder", &decode, py::arg("param"), py::arg("rem"), py::arg("dst"), py::arg("n"),
        "(bf16 bits, int16 remainder) -> fp32.");
  m.def("remainder_exhaustive", &remainder_exhaustive,
        "All 2^32 fp32 patterns through the remainder split: (not exact, not nearest, quiet NaN shown as non-NaN, NaN shown as non-NaN).");
}

}  // namespace host
}  // namespace fastmup
