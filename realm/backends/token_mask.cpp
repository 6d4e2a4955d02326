// A grammar's token mask applied to a row of logits in one pass: -inf wherever the bitmask
// (32 tokens to a uint32 word, token i in word i / 32, bit i % 32) forbids the token.
// NumPy needs several passes and a branch per token, which masks that forbid scattered
// tokens (a string's body in a JSON schema, on gemma3's 262k tokens) make unpredictable.
// A plain C function, not an operator: Python calls it through ctypes on NumPy arrays,
// and no compiled graph depends on it. With AVX-512 a word is two blends of -inf under
// the word's bits (a masked store instead took twice as long on AMD Zen 4); with AVX2 the
// compiler vectorizes the select.

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernel_isa.h"

namespace {

constexpr float kForbidden = -INFINITY;

inline void mask_word(float* row, uint32_t bits, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const float v = row[j];
    row[j] = (bits >> j) & 1u ? v : kForbidden;
  }
}

// Inlined into each caller, so that it is compiled for the caller's instructions.
__attribute__((always_inline)) inline void mask_words(float* logits, const uint32_t* mask, int64_t words) {
  for (int64_t w = 0; w < words; ++w)
    if (mask[w] != 0xFFFFFFFFu) mask_word(logits + 32 * w, mask[w], 32);
}

__attribute__((target("avx2"))) void mask_avx2(float* logits, const uint32_t* mask, int64_t words) {
  mask_words(logits, mask, words);
}

__attribute__((target("avx512f"))) void mask_avx512(float* logits, const uint32_t* mask, int64_t words) {
  const __m512 forbidden = _mm512_set1_ps(kForbidden);
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t banned = ~mask[w];
    if (!banned) continue;
    float* row = logits + 32 * w;
    const __m512 low = _mm512_mask_blend_ps(static_cast<__mmask16>(banned), _mm512_loadu_ps(row), forbidden);
    const __m512 high = _mm512_mask_blend_ps(static_cast<__mmask16>(banned >> 16), _mm512_loadu_ps(row + 16), forbidden);
    _mm512_storeu_ps(row, low);
    _mm512_storeu_ps(row + 16, high);
  }
}

}  // namespace

extern "C" void realm_mask_logits(float* logits, const uint32_t* mask, int64_t n) {
  const int64_t words = n / 32;
  switch (realm::kernel_isa()) {
    case realm::Isa::avx512:
      mask_avx512(logits, mask, words);
      break;
    case realm::Isa::avx2:
      mask_avx2(logits, mask, words);
      break;
    default:
      mask_words(logits, mask, words);
  }
  if (n % 32) mask_word(logits + 32 * words, mask[words], n % 32);
}
