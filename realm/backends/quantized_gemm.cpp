// y = x @ W.T for W in 4- or 8-bit codes, multiplied the way llama.cpp does: the
// activations rounded to 8 bits per block of 32 inputs, each block's product an exact
// integer sum.
//
// W: w = d * q + m per row and block of 32 inputs, q unsigned (0..15, or 0..255: a signed
// int8 code plus 128, with m = -128 d, not stored), d and m in float16. x, per block: x ~ dx * xq, xq
// int8, and sx = dx * sum(xq). So for row n:
//   y[n] = sum_b d[n,b] * dx[b] * (q[n,b] . xq[b])  +  sum_b m[n,b] * sx[b].
// A weight held as P int4 planes (realm/models/quants.py) is P * K inputs long, its plane
// p reading x's blocks again.
//
// Layout: rows in groups of 16, so that one 512-bit register holds 16 rows' partial sums
// and no sum is ever reduced across lanes. Group g, block b, 4 bits: 256 bytes in 4 slices
// of 64; slice u, row r, byte i holds q[r][4u + i] in its low nibble and q[r][16 + 4u + i]
// in its high one. 8 bits: 512 bytes in 8 slices, slice u < 4 holding q[r][4u + i] and
// slice 4 + u holding q[r][16 + 4u + i]. The 16 rows' d (and m) per block are arrays apart.
// A slice against x's bytes 4u..4u+3 broadcast to every row is one vpdpbusd: 64 products.
//
// Three bodies, chosen when the library loads from the CPU's features: AVX512-VNNI, AVX2
// (vpmaddubsw + vpmaddwd) and plain C++. Groups are split across PyTorch's intra-op
// threads; a group's codes are read once for up to TILE rows of x.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

constexpr int BLOCK = 32;  // inputs per block
constexpr int GROUP = 16;  // rows per group
constexpr int GROUP_BLOCK_BYTES = GROUP * BLOCK / 2;
constexpr int TILE = 4;  // rows of x per pass over a group

struct Activations {  // x rounded per block
  const int8_t* q;    // (T, K) codes
  const float* d;     // (T, K / 32) dx
  const float* s;     // (T, K / 32) dx * sum(codes)
  int64_t k_blocks;
};

struct Weights {  // one group of rows
  const uint8_t* codes;  // (blocks, 256)
  const at::Half* d;     // (blocks, 16)
  const at::Half* m;     // (blocks, 16)
  int64_t blocks;        // planes * k_blocks
};

void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s) {
  const int64_t nb = k / BLOCK;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * k + b * BLOCK;
      float amax = 0.f;
      for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float dx = amax / 127.f, inv = dx > 0.f ? 1.f / dx : 0.f;
      int8_t* qb = q + t * k + b * BLOCK;
      int sum = 0;
      for (int i = 0; i < BLOCK; ++i) sum += qb[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
      d[t * nb + b] = dx;
      s[t * nb + b] = dx * static_cast<float>(sum);
    }
}

// One group of W against `tiles` (<= TILE) rows of x from t0: out[t * GROUP + r].
using GroupKernel = void (*)(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out);

template <int BITS>
void group_scalar(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out) {
  for (int t = 0; t < tiles; ++t)
    for (int r = 0; r < GROUP; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        const int64_t xb = (t0 + t) * a.k_blocks + b % a.k_blocks;
        const int8_t* xq = a.q + xb * BLOCK;
        const uint8_t* c = w.codes + b * GROUP_BLOCK_BYTES * BITS / 4;
        int dot = 0;
        for (int u = 0; u < 4; ++u)
          for (int i = 0; i < 4; ++i) {
            if constexpr (BITS == 4) {
              const uint8_t byte = c[u * 64 + r * 4 + i];
              dot += (byte & 0xF) * xq[4 * u + i] + (byte >> 4) * xq[16 + 4 * u + i];
            } else {
              dot += c[u * 64 + r * 4 + i] * xq[4 * u + i] + c[(u + 4) * 64 + r * 4 + i] * xq[16 + 4 * u + i];
            }
          }
        acc += static_cast<float>(w.d[b * GROUP + r]) * a.d[xb] * static_cast<float>(dot) +
               (BITS == 8 ? -128.f * static_cast<float>(w.d[b * GROUP + r]) : static_cast<float>(w.m[b * GROUP + r])) *
                   a.s[xb];
      }
      out[t * GROUP + r] = acc;
    }
}

inline int32_t word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int BITS, int NT>
__attribute__((target("avx2,fma,f16c"))) void group_avx2_tiles(const Weights& w, const Activations& a, int64_t t0,
                                                               float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t kb = a.k_blocks;
  __m256 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    const int64_t xb = b % kb;
    const uint8_t* c = w.codes + b * GROUP_BLOCK_BYTES * BITS / 4;
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then 8-15
      // Slice u's codes against x's bytes at `at[u]`. vpmaddubsw saturates its 16-bit pair
      // sums, so 8-bit codes go in as two nibbles (hi * 16 + lo), never above 15.
      constexpr int SLICES = BITS == 4 ? 8 : 16;
      __m256i v[SLICES];
      int at[SLICES], shift[SLICES];
      for (int u = 0; u < 4; ++u) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + u * 64 + h * 32));
        if constexpr (BITS == 4) {
          v[2 * u] = _mm256_and_si256(raw, low), at[2 * u] = 4 * u, shift[2 * u] = 0;
          v[2 * u + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low), at[2 * u + 1] = 16 + 4 * u;
          shift[2 * u + 1] = 0;
        } else {
          const __m256i upper = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (u + 4) * 64 + h * 32));
          const __m256i parts[4] = {raw, raw, upper, upper};
          for (int j = 0; j < 4; ++j) {
            const __m256i nib = j % 2 ? _mm256_srli_epi16(parts[j], 4) : parts[j];
            v[4 * u + j] = _mm256_and_si256(nib, low);
            at[4 * u + j] = (j < 2 ? 0 : 16) + 4 * u;
            shift[4 * u + j] = j % 2 ? 4 : 0;
          }
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + b * GROUP + h * 8)));
      const __m256 m = BITS == 8 ? _mm256_mul_ps(d, _mm256_set1_ps(-128.f))
                                 : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + b * GROUP + h * 8)));
      for (int t = 0; t < NT; ++t) {
        const int64_t row = (t0 + t) * kb + xb;
        const int8_t* xq = a.q + row * BLOCK;
        __m256i dot = _mm256_setzero_si256();
        for (int u = 0; u < SLICES; ++u) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(v[u], _mm256_set1_epi32(word(xq + at[u]))), ones);
          dot = _mm256_add_epi32(dot, shift[u] ? _mm256_slli_epi32(p, 4) : p);
        }
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(a.d[row])), acc[t][h]);
        acc[t][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[row]), acc[t][h]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm256_storeu_ps(out + t * GROUP, acc[t][0]);
    _mm256_storeu_ps(out + t * GROUP + 8, acc[t][1]);
  }
}

template <int BITS, int NT>
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma"))) void group_avx512_tiles(const Weights& w,
                                                                                       const Activations& a,
                                                                                       int64_t t0, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t kb = a.k_blocks;
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    const int64_t xb = b % kb;
    const uint8_t* c = w.codes + b * GROUP_BLOCK_BYTES * BITS / 4;
    __m512i lo[4], hi[4];
    for (int u = 0; u < 4; ++u) {
      const __m512i raw = _mm512_loadu_si512(c + u * 64);
      if constexpr (BITS == 4) {
        lo[u] = _mm512_and_si512(raw, low);
        hi[u] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      } else {
        lo[u] = raw;
        hi[u] = _mm512_loadu_si512(c + (u + 4) * 64);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.d + b * GROUP)));
    const __m512 m = BITS == 8 ? _mm512_mul_ps(d, _mm512_set1_ps(-128.f))
                               : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.m + b * GROUP)));
    for (int t = 0; t < NT; ++t) {
      const int64_t row = (t0 + t) * kb + xb;
      const int8_t* xq = a.q + row * BLOCK;
      __m512i dot = _mm512_setzero_si512();
      for (int u = 0; u < 4; ++u) {
        dot = _mm512_dpbusd_epi32(dot, lo[u], _mm512_set1_epi32(word(xq + 4 * u)));
        dot = _mm512_dpbusd_epi32(dot, hi[u], _mm512_set1_epi32(word(xq + 16 + 4 * u)));
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.d[row])), acc[t]);
      acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[row]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * GROUP, acc[t]);
}

template <int BITS, template <int, int> class Body>
void by_tiles(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out) {
  switch (tiles) {
    case 1: return Body<BITS, 1>::run(w, a, t0, out);
    case 2: return Body<BITS, 2>::run(w, a, t0, out);
    case 3: return Body<BITS, 3>::run(w, a, t0, out);
    default: return Body<BITS, 4>::run(w, a, t0, out);
  }
}

template <int BITS, int NT>
struct Avx512 {
  static void run(const Weights& w, const Activations& a, int64_t t0, float* out) {
    group_avx512_tiles<BITS, NT>(w, a, t0, out);
  }
};

template <int BITS, int NT>
struct Avx2 {
  static void run(const Weights& w, const Activations& a, int64_t t0, float* out) {
    group_avx2_tiles<BITS, NT>(w, a, t0, out);
  }
};

struct Choice {
  GroupKernel int4, int8;
  const char* name;
};

// REALM_KERNEL_ISA=avx2 or =scalar caps the choice (tests run every body on one machine).
Choice pick_kernel() {
  __builtin_cpu_init();
  const char* cap = std::getenv("REALM_KERNEL_ISA");
  const std::string most = cap ? cap : "";
  if (most == "scalar") return {group_scalar<4>, group_scalar<8>, "scalar"};
  if (most != "avx2" && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
    return {by_tiles<4, Avx512>, by_tiles<8, Avx512>, "avx512-vnni"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {by_tiles<4, Avx2>, by_tiles<8, Avx2>, "avx2"};
  return {group_scalar<4>, group_scalar<8>, "scalar"};
}

const Choice KERNEL = pick_kernel();

at::Tensor gemm(int bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                const at::Tensor& mins, int64_t out_features) {
  const int64_t block_bytes = GROUP_BLOCK_BYTES * bits / 4;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemm: x must be (T, K) float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "gemm: codes must be (N / 16, blocks * 256) uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "gemm: scales must be contiguous float16");
  TORCH_CHECK(bits == 8 || (mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.numel() == scales.numel()),
              "gemm: mins must be contiguous float16, as many as the scales");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1), groups = codes.size(0);
  const int64_t blocks = codes.size(1) / block_bytes;
  TORCH_CHECK(k % BLOCK == 0 && blocks > 0 && blocks % (k / BLOCK) == 0 &&
                  codes.size(1) == blocks * block_bytes, "gemm: W's inputs must be P whole copies of x's");
  TORCH_CHECK(scales.numel() == groups * blocks * GROUP, "gemm: scales must be (N / 16, blocks * 16)");
  TORCH_CHECK(out_features <= groups * GROUP, "gemm: more outputs than rows");
  at::Tensor q = at::empty({rows, k}, xc.options().dtype(at::kChar));
  at::Tensor d = at::empty({rows, k / BLOCK}, xc.options());
  at::Tensor s = at::empty({rows, k / BLOCK}, xc.options());
  quantize_rows(xc.data_ptr<float>(), rows, k, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>());
  const Activations a{q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>(), k / BLOCK};
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  float* out = y.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* dw = scales.data_ptr<at::Half>();
  const at::Half* mw = bits == 4 ? mins.data_ptr<at::Half>() : nullptr;
  const GroupKernel kernel = bits == 4 ? KERNEL.int4 : KERNEL.int8;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    float tile[TILE * GROUP];
    for (int64_t g = begin; g < end; ++g) {
      const Weights w{c + g * blocks * block_bytes, dw + g * blocks * GROUP, mw + g * blocks * GROUP, blocks};
      const int64_t n0 = g * GROUP, live = std::min<int64_t>(GROUP, out_features - n0);
      for (int64_t t0 = 0; t0 < rows; t0 += TILE) {
        const int tiles = static_cast<int>(std::min<int64_t>(TILE, rows - t0));
        kernel(w, a, t0, tiles, tile);
        for (int t = 0; t < tiles; ++t) std::memcpy(out + (t0 + t) * out_features + n0, tile + t * GROUP, live * 4);
      }
    }
  });
  return y;
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t out_features) {
  return gemm(4, x, codes, scales, mins, out_features);
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t out_features) {
  return gemm(8, x, codes, scales, at::Tensor(), out_features);
}

std::string isa() { return KERNEL.name; }

}  // namespace

TORCH_LIBRARY(realm, m) {
  m.def("int4_gemm(Tensor x, Tensor codes, Tensor scales, Tensor mins, int out_features) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor codes, Tensor scales, int out_features) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(realm, CPU, m) {
  m.impl("int4_gemm", int4_gemm);
  m.impl("int8_gemm", int8_gemm);
}
