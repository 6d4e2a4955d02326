// Decode attention straight over the paged KV pool: each row of a step (one new token of
// one sequence) against the keys and values its block table names, up to its position and
// within its sliding window; a float16 pool, float32 arithmetic.
//
// PyTorch's ops did this by gathering every row's keys and values into new tensors (a copy
// of the whole context, per layer and step) and two batched products through MKL, whose
// fixed cost dwarfs products this small: at depth 192 on smollm2, 0.9 ms of a 5.2 ms step.
//
// Work is split in items of (row, kv head, span of up to SPAN positions) across PyTorch's
// threads, so that one long sequence still uses every core. An item's G query heads (those
// that share its kv head) read each key and value row once; it keeps its own maximum, sum
// and weighted values, and the spans of a (row, kv head) merge at the end (as in
// flash-decoding). Two bodies: AVX-512 (head_dim a multiple of 16) and plain C++.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernel_isa.h"

namespace {

constexpr int64_t SPAN = 128;     // positions an item covers
constexpr int64_t MAX_GROUP = 16;  // query heads a kv head
constexpr int64_t AHEAD = 8;       // positions ahead whose rows are prefetched

struct Problem {
  const float* q;  // (B, kv_heads * group, dim)
  const at::Half* keys;
  const at::Half* values;  // (blocks, kv_heads, block_size, dim)
  const int64_t* tables;   // (B, table_len)
  int64_t table_len, kv_heads, group, dim, block_size;
  float scale;

};

struct Item {
  int64_t row, head, first, last;  // positions [first, last)
};

// Where each position of an item keeps its key (or value) row, relative to the pool's
// start: one division per item, not one per position.
void row_offsets(const Problem& p, const Item& it, int64_t* offsets) {
  int64_t entry = it.first / p.block_size, within = it.first % p.block_size;
  for (int64_t s = 0; s < it.last - it.first; ++s) {
    offsets[s] = ((p.tables[it.row * p.table_len + entry] * p.kv_heads + it.head) * p.block_size + within) * p.dim;
    if (++within == p.block_size) within = 0, ++entry;
  }
}

// One item: max[g], sum[g] and out[g * dim + d] = sum over positions of exp(score - max) * v.
void span_scalar(const Problem& p, const Item& it, float* max, float* sum, float* out) {
  const int64_t n = it.last - it.first, g_count = p.group, dim = p.dim;
  const float* q = p.q + (it.row * p.kv_heads + it.head) * g_count * dim;
  float scores[MAX_GROUP][SPAN];
  int64_t rows[SPAN];
  row_offsets(p, it, rows);
  for (int64_t s = 0; s < n; ++s) {
    const at::Half* k = p.keys + rows[s];
    for (int64_t g = 0; g < g_count; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += q[g * dim + d] * static_cast<float>(k[d]);
      scores[g][s] = dot * p.scale;
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    max[g] = *std::max_element(scores[g], scores[g] + n);
    sum[g] = 0.f;
    for (int64_t s = 0; s < n; ++s) sum[g] += scores[g][s] = std::exp(scores[g][s] - max[g]);
  }
  std::fill(out, out + g_count * dim, 0.f);
  for (int64_t s = 0; s < n; ++s) {
    const at::Half* v = p.values + rows[s];
    for (int64_t g = 0; g < g_count; ++g)
      for (int64_t d = 0; d < dim; ++d) out[g * dim + d] += scores[g][s] * static_cast<float>(v[d]);
  }
}

// exp(x) for x <= 0 (scores less their maximum): Cephes' polynomial on x - n ln 2, times 2^n.
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx512f,f16c,fma"))) inline __m512 load_half(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The 16 lanes of each of a, b, c, d summed: {sum a, sum b, sum c, sum d}.
__attribute__((target("avx512f"))) inline __m128 sum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));  // a|b|c|d
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));  // each quarter's sum in all its lanes
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t));
}

// Scores of heads g0 .. g0 + H (H <= 4) for positions s .. s + 4: each key row is widened
// once for the H heads, and every four dot products share one reduction.
template <int H>
__attribute__((target("avx512f,f16c,fma"))) void scores4_avx512(const Problem& p, const float* q, const int64_t* rows,
                                                                int64_t s, int64_t g0, float (*scores)[SPAN]) {
  __m512 acc[H][4];
  for (int g = 0; g < H; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j)  // rows a few positions on: the pool's blocks are too short for the hardware's prefetch
    for (int64_t line = 0; line < p.dim * 2; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p.keys + rows[s + AHEAD + j]) + line, _MM_HINT_T0);
  for (int64_t d = 0; d < p.dim; d += 16) {
    __m512 k[4];
    for (int j = 0; j < 4; ++j) k[j] = load_half(p.keys + rows[s + j] + d);
    for (int g = 0; g < H; ++g) {
      const __m512 qg = _mm512_loadu_ps(q + (g0 + g) * p.dim + d);
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(qg, k[j], acc[g][j]);
    }
  }
  for (int g = 0; g < H; ++g)
    _mm_storeu_ps(scores[g0 + g] + s,
                  _mm_mul_ps(sum4_avx512(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), _mm_set1_ps(p.scale)));
}

// out[g] += sum over positions of weight[g][s] * v[s], heads g0 .. g0 + H, 16 dims at a time.
template <int H>
__attribute__((target("avx512f,f16c,fma"))) void values_avx512(const Problem& p, const int64_t* rows, int64_t n,
                                                               int64_t g0, const float (*weights)[SPAN], float* out) {
  for (int64_t d = 0; d < p.dim; d += 16) {
    __m512 acc[H];
    for (int g = 0; g < H; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      if (d == 0)
        for (int64_t line = 0; line < p.dim * 2; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p.values + rows[s + AHEAD]) + line, _MM_HINT_T0);
      const __m512 v = load_half(p.values + rows[s] + d);
      for (int g = 0; g < H; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[g0 + g][s]), v, acc[g]);
    }
    for (int g = 0; g < H; ++g) _mm512_storeu_ps(out + (g0 + g) * p.dim + d, acc[g]);
  }
}

template <template <int> class Body, typename... Args>
void by_heads(int64_t heads, Args... args) {  // Body<H> for heads in fours, then the rest
  int64_t g0 = 0;
  for (; g0 + 4 <= heads; g0 += 4) Body<4>::run(args..., g0);
  switch (heads - g0) {
    case 3: return Body<3>::run(args..., g0);
    case 2: return Body<2>::run(args..., g0);
    case 1: return Body<1>::run(args..., g0);
    default: return;
  }
}

template <int H>
struct Scores4 {
  static void run(const Problem& p, const float* q, const int64_t* rows, int64_t s, float (*scores)[SPAN], int64_t g0) {
    scores4_avx512<H>(p, q, rows, s, g0, scores);
  }
};

template <int H>
struct Values {
  static void run(const Problem& p, const int64_t* rows, int64_t n, const float (*weights)[SPAN], float* out, int64_t g0) {
    values_avx512<H>(p, rows, n, g0, weights, out);
  }
};

__attribute__((target("avx512f,f16c,fma"))) void span_avx512(const Problem& p, const Item& it, float* max, float* sum,
                                                             float* out) {
  const int64_t n = it.last - it.first, g_count = p.group, padded = (n + 15) / 16 * 16;
  const float* q = p.q + (it.row * p.kv_heads + it.head) * g_count * p.dim;
  alignas(64) float scores[MAX_GROUP][SPAN];
  int64_t rows[SPAN + AHEAD + 4];
  row_offsets(p, it, rows);
  std::fill(rows + n, rows + n + AHEAD + 4, rows[0]);  // past the span: row 0 again, read and dropped
  for (int64_t s = 0; s < n; s += 4) by_heads<Scores4>(g_count, p, q, static_cast<const int64_t*>(rows), s, scores);
  for (int64_t g = 0; g < g_count; ++g) {
    std::fill(scores[g] + n, scores[g] + padded, -std::numeric_limits<float>::infinity());
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < padded; s += 16) m = _mm512_max_ps(m, _mm512_load_ps(scores[g] + s));
    max[g] = _mm512_reduce_max_ps(m);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < padded; s += 16) {  // the padding's exp is 0
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_load_ps(scores[g] + s), _mm512_set1_ps(max[g])));
      _mm512_store_ps(scores[g] + s, e);
      total = _mm512_add_ps(total, e);
    }
    sum[g] = _mm512_reduce_add_ps(total);
  }
  by_heads<Values>(g_count, p, static_cast<const int64_t*>(rows), n, static_cast<const float (*)[SPAN]>(scores), out);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& tables, const at::Tensor& positions, int64_t window, double scale) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kHalf && keys.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kHalf && values.is_contiguous(),
              "paged_attention: keys and values must be contiguous float16 (blocks, kv_heads, block_size, dim)");
  const int64_t blocks = keys.size(0), kv_heads = keys.size(1), block_size = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.size(1) % (kv_heads * dim) == 0,
              "paged_attention: q must be float32 (rows, heads * dim), heads a multiple of kv_heads");
  const int64_t rows = q.size(0), group = q.size(1) / (kv_heads * dim);
  TORCH_CHECK(group >= 1 && group <= MAX_GROUP, "paged_attention: at most ", MAX_GROUP, " query heads a kv head");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == rows && tables.scalar_type() == at::kLong,
              "paged_attention: tables must be int64 (rows, blocks a row)");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == rows && positions.scalar_type() == at::kLong,
              "paged_attention: positions must be int64 (rows,)");
  const at::Tensor qc = q.contiguous(), tc = tables.contiguous(), pc = positions.contiguous();
  const int64_t* table = tc.data_ptr<int64_t>();
  const int64_t* position = pc.data_ptr<int64_t>();
  const int64_t table_len = tc.size(1);

  std::vector<Item> items;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t last = position[r] + 1, first = window > 0 ? std::max<int64_t>(0, last - window) : 0;
    TORCH_CHECK(position[r] >= 0 && last <= table_len * block_size, "paged_attention: a position past its table");
    for (int64_t b = first / block_size; b * block_size < last; ++b)
      TORCH_CHECK(table[r * table_len + b] >= 0 && table[r * table_len + b] < blocks,
                  "paged_attention: a table names a block outside the pool");
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t s = first; s < last; s += SPAN) items.push_back({r, h, s, std::min(last, s + SPAN)});
  }
  const Problem p{qc.data_ptr<float>(), keys.data_ptr<at::Half>(), values.data_ptr<at::Half>(), table, table_len,
                  kv_heads, group, dim, block_size, static_cast<float>(scale)};
  const auto span = realm::kernel_isa() == realm::Isa::avx512 && dim % 16 == 0 ? span_avx512 : span_scalar;

  const int64_t n = static_cast<int64_t>(items.size()), per_item = group * (2 + dim);
  std::vector<float> partial(n * per_item);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* at = partial.data() + i * per_item;
      span(p, items[i], at, at + group, at + 2 * group);
    }
  });

  at::Tensor out = at::zeros({rows, kv_heads * group * dim}, q.options());
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n;) {  // the spans of one (row, kv head) are consecutive items
    int64_t j = i;
    while (j < n && items[j].row == items[i].row && items[j].head == items[i].head) ++j;
    float* dst = o + (items[i].row * kv_heads + items[i].head) * group * dim;
    for (int64_t g = 0; g < group; ++g) {
      float m = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t k = i; k < j; ++k) m = std::max(m, partial[k * per_item + g]);
      for (int64_t k = i; k < j; ++k) {
        const float* at = partial.data() + k * per_item;
        const float w = std::exp(at[g] - m);
        total += w * at[group + g];
        for (int64_t d = 0; d < dim; ++d) dst[g * dim + d] += w * at[2 * group + g * dim + d];
      }
      for (int64_t d = 0; d < dim; ++d) dst[g * dim + d] /= total;
    }
    i = j;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(realm, m) {
  m.def("paged_attention(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor positions, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(realm, CPU, m) { m.impl("paged_attention", paged_attention); }
