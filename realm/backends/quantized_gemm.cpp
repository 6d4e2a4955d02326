// y = x @ W.T for W in 4-, 5- or 8-bit codes, multiplied the way llama.cpp does: the
// activations rounded to 8 bits per block of 32 inputs, each block's product an exact
// integer sum.
//
// x, per block of 32: x ~ dx * xq, xq int8; sx = dx * sum(xq), and the integer sums of
// each half (16 inputs) of xq. W per row and block of 32 inputs:
//   4 or 5 bits: w = d * q + m, q in 0..15 or 0..31, d and m float16:
//     y[n] += d * dx * (q . xq) + m * sx
//   8 bits: w = d * (u - 128), u in 0..255 (a signed code plus 128), d float16, one per
//   block or one per half-block (Q6_K's scales change every 16 weights):
//     y[n] += d_h * dx * ((u . xq)_h - 128 * sum_h(xq))     for each half h
// A weight held as P int4 planes (realm/models/quants.py) is P * K inputs long, its plane
// p reading x's blocks again.
//
// Layout: rows in groups of 16, so that one 512-bit register holds 16 rows' partial sums
// and no sum is ever reduced across lanes. Group g, block b, 4 bits: 256 bytes in 4 slices
// of 64; slice u, row r, byte i holds q[r][4u + i] in its low nibble and q[r][16 + 4u + i]
// in its high one. 8 bits: 512 bytes in 8 slices, slice u < 4 holding u[r][4u + i] and
// slice 4 + u holding u[r][16 + 4u + i]. 5 bits: the 4-bit layout of the low nibbles, then
// 64 bytes of fifth bits, 8 little-endian uint64 in the order of the 4-bit codes they
// complete (the low nibbles of slices 0-3, then their high nibbles), bit 4r + i for row r,
// byte i. Scales (and mins) are arrays apart, per block
// the 16 rows' (per half-block: the first half's 16, then the second's). A slice against
// x's bytes 4u..4u+3 broadcast to every row is one vpdpbusd: 64 products.
//
// Three bodies, chosen when the library loads from the CPU's features: AVX512-VNNI, AVX2
// (vpmaddubsw + vpmaddwd) and plain C++. Groups are split across PyTorch's intra-op
// threads; a group's codes are read once for up to TILE rows of x.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernel_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace {

constexpr int BLOCK = 32;  // inputs per block
constexpr int GROUP = 16;  // rows per group
constexpr int TILE = 4;    // rows of x per pass over a group
constexpr int PREFETCH = 8;  // blocks ahead of the one in hand (see prefetch_block)

struct Activations {  // x rounded per block
  const int8_t* q;    // (T, K) codes
  const float* d;     // (T, K / 32) dx
  const float* s;     // (T, K / 32) dx * sum(codes)
  const int32_t* h;   // (T, K / 16) sum(codes) per half-block
  int64_t k_blocks;
};

struct Weights {  // one group of rows
  const uint8_t* codes;  // (blocks, 256 or 512)
  const at::Half* d;     // (blocks, SCALES, 16)
  const at::Half* m;     // (blocks, 16), 4 bits only
  int64_t blocks;        // planes * k_blocks
};

void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s, int32_t* h) {
  const int64_t nb = k / BLOCK;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * k + b * BLOCK;
      float amax = 0.f;
      for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float dx = amax / 127.f, inv = dx > 0.f ? 1.f / dx : 0.f;
      int8_t* qb = q + t * k + b * BLOCK;
      int half[2] = {0, 0};
      for (int i = 0; i < BLOCK; ++i) half[i / 16] += qb[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
      d[t * nb + b] = dx;
      s[t * nb + b] = dx * static_cast<float>(half[0] + half[1]);
      h[(t * nb + b) * 2] = half[0];
      h[(t * nb + b) * 2 + 1] = half[1];
    }
}

__attribute__((target("avx512f,avx512bw"))) void quantize_rows_avx512(const float* x, int64_t rows, int64_t k, int8_t* q,
                                                                      float* d, float* s, int32_t* h) {
  // quantize_rows, 16 inputs a register: the same rounding (to nearest even), the same sums.
  const int64_t nb = k / BLOCK;
  for (int64_t i = 0; i < rows * nb; ++i) {
    const __m512 x0 = _mm512_loadu_ps(x + i * BLOCK), x1 = _mm512_loadu_ps(x + i * BLOCK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float dx = amax / 127.f, inv = dx > 0.f ? 1.f / dx : 0.f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * BLOCK), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * BLOCK + 16), _mm512_cvtepi32_epi8(q1));
    const int32_t half0 = _mm512_reduce_add_epi32(q0), half1 = _mm512_reduce_add_epi32(q1);
    d[i] = dx;
    s[i] = dx * static_cast<float>(half0 + half1);
    h[i * 2] = half0;
    h[i * 2 + 1] = half1;
  }
}

constexpr int block_bytes(int bits) { return GROUP * BLOCK * bits / 8; }

// A 5-bit block's fifth-bit word j (0-3: the low nibbles' slices, 4-7: the high ones').
inline uint64_t fifth_word(const uint8_t* block, int j) {
  uint64_t v;
  std::memcpy(&v, block + 256 + 8 * j, 8);
  return v;
}

inline int fifth_bit(const uint8_t* block, int j, int bit) { return static_cast<int>((fifth_word(block, j) >> bit) & 1); }

// One group of W against `tiles` (<= TILE) rows of x from t0: out[t * GROUP + r].
using GroupKernel = void (*)(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out);

template <int BITS, int SCALES>
void group_scalar(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out) {
  for (int t = 0; t < tiles; ++t)
    for (int r = 0; r < GROUP; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        const int64_t xb = (t0 + t) * a.k_blocks + b % a.k_blocks;
        const int8_t* xq = a.q + xb * BLOCK;
        const uint8_t* c = w.codes + b * block_bytes(BITS);
        int dot[2] = {0, 0};  // per half-block
        for (int u = 0; u < 4; ++u)
          for (int i = 0; i < 4; ++i) {
            const int at = u * 64 + r * 4 + i;
            int first = BITS == 8 ? c[at] : c[at] & 0xF, second = BITS == 8 ? c[256 + at] : c[at] >> 4;
            if constexpr (BITS == 5) {
              first |= fifth_bit(c, u, r * 4 + i) << 4;
              second |= fifth_bit(c, 4 + u, r * 4 + i) << 4;
            }
            dot[0] += first * xq[4 * u + i];
            dot[1] += second * xq[16 + 4 * u + i];
          }
        if constexpr (BITS != 8) {
          acc += static_cast<float>(w.d[b * GROUP + r]) * a.d[xb] * static_cast<float>(dot[0] + dot[1]) +
                 static_cast<float>(w.m[b * GROUP + r]) * a.s[xb];
        } else {
          for (int half = 0; half < 2; ++half) {
            const float d = static_cast<float>(w.d[(b * SCALES + (SCALES == 2 ? half : 0)) * GROUP + r]);
            acc += d * a.d[xb] * static_cast<float>(dot[half] - 128 * a.h[xb * 2 + half]);
          }
        }
      }
      out[t * GROUP + r] = acc;
    }
}

// Ask for block b + PREFETCH's codes and scales now: without it a thread stalls at every
// new group and every small call (smollm2's layer weights streamed at ~23 GB/s, ~31 with it).
template <int BITS, int SCALES>
inline void prefetch_block(const Weights& w, int64_t b) {
  const char* c = reinterpret_cast<const char*>(w.codes + (b + PREFETCH) * block_bytes(BITS));
  for (int u = 0; u < block_bytes(BITS) / 64; ++u) _mm_prefetch(c + u * 64, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w.d + (b + PREFETCH) * SCALES * GROUP), _MM_HINT_T0);
  if constexpr (BITS != 8) _mm_prefetch(reinterpret_cast<const char*>(w.m + (b + PREFETCH) * GROUP), _MM_HINT_T0);
}

inline int32_t word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 32 bits as 32 bytes, 16 where the bit is set (byte j from bit j): a 5-bit code's top.
__attribute__((target("avx2"))) inline __m256i sixteens_avx2(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                               0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(16));
}

template <int BITS, int SCALES, int NT>
__attribute__((target("avx2,fma,f16c"))) void group_avx2_tiles(const Weights& w, const Activations& a, int64_t t0,
                                                               float* out) {
  // vpmaddubsw saturates its 16-bit pair sums, so 8-bit codes go in as nibbles (hi * 16 +
  // lo), never above 15 (5-bit codes, up to 31, stay under it whole); 16 products of a
  // slice-half, 8 rows a register.
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t kb = a.k_blocks;
  __m256 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0, xb = 0; b < w.blocks; ++b, xb = xb + 1 == kb ? 0 : xb + 1) {
    const uint8_t* c = w.codes + b * block_bytes(BITS);
    prefetch_block<BITS, SCALES>(w, b);
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then 8-15
      constexpr int PARTS = BITS == 8 ? 16 : 8;
      __m256i v[PARTS];
      int at[PARTS], shift[PARTS], half[PARTS];
      for (int u = 0; u < 4; ++u) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + u * 64 + h * 32));
        if constexpr (BITS != 8) {
          v[2 * u] = _mm256_and_si256(raw, low), at[2 * u] = 4 * u, shift[2 * u] = 0, half[2 * u] = 0;
          v[2 * u + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low), at[2 * u + 1] = 16 + 4 * u;
          shift[2 * u + 1] = 0, half[2 * u + 1] = 1;
          if constexpr (BITS == 5) {  // rows 8h.. are bits 32h.. of each word
            v[2 * u] = _mm256_or_si256(v[2 * u], sixteens_avx2(static_cast<uint32_t>(fifth_word(c, u) >> (32 * h))));
            v[2 * u + 1] =
                _mm256_or_si256(v[2 * u + 1], sixteens_avx2(static_cast<uint32_t>(fifth_word(c, 4 + u) >> (32 * h))));
          }
        } else {
          const __m256i upper = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 256 + u * 64 + h * 32));
          const __m256i parts[4] = {raw, raw, upper, upper};
          for (int j = 0; j < 4; ++j) {
            v[4 * u + j] = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(parts[j], 4) : parts[j], low);
            at[4 * u + j] = (j < 2 ? 0 : 16) + 4 * u;
            shift[4 * u + j] = j % 2 ? 4 : 0;
            half[4 * u + j] = j / 2;
          }
        }
      }
      const at::Half* ds = w.d + b * SCALES * GROUP + h * 8;  // (lambdas lose the target attribute)
      const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ds)));
      const __m256 d1 = SCALES == 2 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ds + GROUP))) : d0;
      __m256 m = _mm256_setzero_ps();
      if constexpr (BITS != 8)
        m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + b * GROUP + h * 8)));
      for (int t = 0; t < NT; ++t) {
        const int64_t row = (t0 + t) * kb + xb;
        const int8_t* xq = a.q + row * BLOCK;
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int u = 0; u < PARTS; ++u) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(v[u], _mm256_set1_epi32(word(xq + at[u]))), ones);
          dot[half[u]] = _mm256_add_epi32(dot[half[u]], shift[u] ? _mm256_slli_epi32(p, 4) : p);
        }
        const __m256 dx = _mm256_set1_ps(a.d[row]);
        if constexpr (BITS != 8) {
          acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot[0], dot[1])), _mm256_mul_ps(d0, dx), acc[t][h]);
          acc[t][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[row]), acc[t][h]);
        } else {
          for (int k = 0; k < 2; ++k) {
            const __m256i exact = _mm256_sub_epi32(dot[k], _mm256_set1_epi32(128 * a.h[row * 2 + k]));
            acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(k ? d1 : d0, dx), acc[t][h]);
          }
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm256_storeu_ps(out + t * GROUP, acc[t][0]);
    _mm256_storeu_ps(out + t * GROUP + 8, acc[t][1]);
  }
}

template <int BITS, int SCALES, int NT>
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma"))) void group_avx512_tiles(const Weights& w,
                                                                                       const Activations& a,
                                                                                       int64_t t0, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  const int64_t kb = a.k_blocks;
  __m512 acc[NT], mins[NT];  // two sums, so that neither waits on the other's latency
  for (int t = 0; t < NT; ++t) acc[t] = mins[t] = _mm512_setzero_ps();
  for (int64_t b = 0, xb = 0; b < w.blocks; ++b, xb = xb + 1 == kb ? 0 : xb + 1) {  // xb = b % kb, no division
    const uint8_t* c = w.codes + b * block_bytes(BITS);
    prefetch_block<BITS, SCALES>(w, b);
    __m512i first[4], second[4];  // per slice: the products with inputs 4u.. and 16 + 4u..
    for (int u = 0; u < 4; ++u) {
      const __m512i raw = _mm512_loadu_si512(c + u * 64);
      if constexpr (BITS != 8) {
        first[u] = _mm512_and_si512(raw, low);
        second[u] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        if constexpr (BITS == 5) {
          first[u] = _mm512_or_si512(first[u], _mm512_maskz_mov_epi8(_cvtu64_mask64(fifth_word(c, u)), sixteen));
          second[u] = _mm512_or_si512(second[u], _mm512_maskz_mov_epi8(_cvtu64_mask64(fifth_word(c, 4 + u)), sixteen));
        }
      } else {
        first[u] = raw;
        second[u] = _mm512_loadu_si512(c + 256 + u * 64);
      }
    }
    const at::Half* ds = w.d + b * SCALES * GROUP;
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ds)));
    const __m512 d1 = SCALES == 2 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ds + GROUP))) : d0;
    __m512 m = _mm512_setzero_ps();
    if constexpr (BITS != 8) m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.m + b * GROUP)));
    for (int t = 0; t < NT; ++t) {
      const int64_t row = (t0 + t) * kb + xb;
      const int8_t* xq = a.q + row * BLOCK;
      __m512i dot0 = _mm512_setzero_si512(), dot1 = _mm512_setzero_si512();
      for (int u = 0; u < 4; ++u) {
        dot0 = _mm512_dpbusd_epi32(dot0, first[u], _mm512_set1_epi32(word(xq + 4 * u)));
        dot1 = _mm512_dpbusd_epi32(dot1, second[u], _mm512_set1_epi32(word(xq + 16 + 4 * u)));
      }
      const __m512 dx = _mm512_set1_ps(a.d[row]);
      if constexpr (BITS != 8) {
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot0, dot1)), _mm512_mul_ps(d0, dx), acc[t]);
        mins[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[row]), mins[t]);
      } else if constexpr (SCALES == 1) {
        const __m512i exact = _mm512_sub_epi32(_mm512_add_epi32(dot0, dot1),
                                               _mm512_set1_epi32(128 * (a.h[row * 2] + a.h[row * 2 + 1])));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(d0, dx), acc[t]);
      } else {
        const __m512i exact0 = _mm512_sub_epi32(dot0, _mm512_set1_epi32(128 * a.h[row * 2]));
        const __m512i exact1 = _mm512_sub_epi32(dot1, _mm512_set1_epi32(128 * a.h[row * 2 + 1]));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact0), _mm512_mul_ps(d0, dx), acc[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact1), _mm512_mul_ps(d1, dx), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * GROUP, _mm512_add_ps(acc[t], mins[t]));
}

template <int BITS, int SCALES, template <int, int, int> class Body>
void by_tiles(const Weights& w, const Activations& a, int64_t t0, int tiles, float* out) {
  switch (tiles) {
    case 1: return Body<BITS, SCALES, 1>::run(w, a, t0, out);
    case 2: return Body<BITS, SCALES, 2>::run(w, a, t0, out);
    case 3: return Body<BITS, SCALES, 3>::run(w, a, t0, out);
    default: return Body<BITS, SCALES, 4>::run(w, a, t0, out);
  }
}

template <int BITS, int SCALES, int NT>
struct Avx512 {
  static void run(const Weights& w, const Activations& a, int64_t t0, float* out) {
    group_avx512_tiles<BITS, SCALES, NT>(w, a, t0, out);
  }
};

template <int BITS, int SCALES, int NT>
struct Avx2 {
  static void run(const Weights& w, const Activations& a, int64_t t0, float* out) {
    group_avx2_tiles<BITS, SCALES, NT>(w, a, t0, out);
  }
};

using Quantizer = void (*)(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s, int32_t* h);

struct Choice {
  GroupKernel int4, int5, int8, int8_halves;
  Quantizer quantize;
  const char* name;
};

Choice pick_kernel() {
  switch (realm::kernel_isa()) {
    case realm::Isa::avx512:
      return {by_tiles<4, 1, Avx512>, by_tiles<5, 1, Avx512>, by_tiles<8, 1, Avx512>, by_tiles<8, 2, Avx512>,
              quantize_rows_avx512, "avx512-vnni"};
    case realm::Isa::avx2:
      return {by_tiles<4, 1, Avx2>, by_tiles<5, 1, Avx2>, by_tiles<8, 1, Avx2>, by_tiles<8, 2, Avx2>, quantize_rows,
              "avx2"};
    default:
      return {group_scalar<4, 1>, group_scalar<5, 1>, group_scalar<8, 1>, group_scalar<8, 2>, quantize_rows, "scalar"};
  }
}

const Choice KERNEL = pick_kernel();

at::Tensor gemm(int bits, int scales_per_block, const at::Tensor& x, const at::Tensor& codes,
                const at::Tensor& scales, const at::Tensor& mins, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemm: x must be (T, K) float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "gemm: codes must be (N / 16, blocks * bytes a block) uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "gemm: scales must be contiguous float16");
  TORCH_CHECK(scales_per_block == 1 || scales_per_block == 2, "gemm: one or two scales a block");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1), groups = codes.size(0);
  const int64_t per_block = block_bytes(bits), blocks = codes.size(1) / per_block;
  TORCH_CHECK(k % BLOCK == 0 && blocks > 0 && blocks % (k / BLOCK) == 0 && codes.size(1) == blocks * per_block,
              "gemm: W's inputs must be P whole copies of x's");
  TORCH_CHECK(scales.numel() == groups * blocks * scales_per_block * GROUP, "gemm: scales must be (N / 16, blocks * 16 * scales a block)");
  TORCH_CHECK(bits == 8 || (mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.numel() == scales.numel()),
              "gemm: mins must be contiguous float16, as many as the scales");
  TORCH_CHECK(out_features <= groups * GROUP, "gemm: more outputs than rows");
  // x's codes, then per block dx, sx and the two half sums: one allocation, 64-byte aligned parts.
  const int64_t nb = rows * (k / BLOCK), q_bytes = (rows * k + 63) / 64 * 64, f_bytes = (nb * 4 + 63) / 64 * 64;
  at::Tensor scratch = at::empty({q_bytes + 2 * f_bytes + nb * 8}, xc.options().dtype(at::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  int8_t* q = reinterpret_cast<int8_t*>(base);
  float* d = reinterpret_cast<float*>(base + q_bytes);
  float* s = reinterpret_cast<float*>(base + q_bytes + f_bytes);
  int32_t* h = reinterpret_cast<int32_t*>(base + q_bytes + 2 * f_bytes);
  KERNEL.quantize(xc.data_ptr<float>(), rows, k, q, d, s, h);
  const Activations a{q, d, s, h, k / BLOCK};
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  float* out = y.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* dw = scales.data_ptr<at::Half>();
  const at::Half* mw = bits != 8 ? mins.data_ptr<at::Half>() : nullptr;
  const GroupKernel kernel = bits == 4   ? KERNEL.int4
                             : bits == 5 ? KERNEL.int5
                             : scales_per_block == 1 ? KERNEL.int8
                                                     : KERNEL.int8_halves;
  const int64_t group_scales = blocks * scales_per_block * GROUP;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    float tile[TILE * GROUP];
    for (int64_t g = begin; g < end; ++g) {
      const Weights w{c + g * blocks * per_block, dw + g * group_scales, mw ? mw + g * blocks * GROUP : nullptr, blocks};
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
  return gemm(4, 1, x, codes, scales, mins, out_features);
}

at::Tensor int5_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t out_features) {
  return gemm(5, 1, x, codes, scales, mins, out_features);
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t scales_per_block,
                     int64_t out_features) {
  return gemm(8, static_cast<int>(scales_per_block), x, codes, scales, at::Tensor(), out_features);
}

std::string isa() { return KERNEL.name; }

}  // namespace

TORCH_LIBRARY(realm, m) {
  m.def("int4_gemm(Tensor x, Tensor codes, Tensor scales, Tensor mins, int out_features) -> Tensor");
  m.def("int5_gemm(Tensor x, Tensor codes, Tensor scales, Tensor mins, int out_features) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor codes, Tensor scales, int scales_per_block, int out_features) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(realm, CPU, m) {
  m.impl("int4_gemm", int4_gemm);
  m.impl("int5_gemm", int5_gemm);
  m.impl("int8_gemm", int8_gemm);
}
