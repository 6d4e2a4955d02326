// A row's k best logits and their token ids, in one pass: what `realm_forward_top` hands a
// guest instead of the whole row (engine/best_tokens.py). The order is the sampler's
// (docs/ABI.md, "Sampling"): larger first, equal logits the lower id first, NaN above
// everything (argmax takes the first NaN); -inf is never among them. The pass keeps the best
// so far sorted and skips, 64 or 32 logits at a time, everything not above the k-th of them;
// once k are held that is almost every logit. PyTorch's topk (and Realm's two-pass
// `largest`) cost 60 to 110 us on one row through the dispatcher; this is a plain C function
// that Python calls through ctypes on a NumPy row.

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernel_isa.h"

namespace {

struct Best {
  int32_t* ids;
  float* values;
  int32_t k;
  int32_t held = 0;

  // Whether x (at a later id than every one held) belongs among the best: it is NaN and the
  // k-th is not, or it is larger than the k-th; anything but -inf while fewer than k are held.
  bool takes(float x) const {
    if (x == -INFINITY) return false;
    if (held < k) return true;
    const float last = values[k - 1];
    return std::isnan(x) ? !std::isnan(last) : x > last;
  }

  void put(float x, int32_t id) {
    int32_t at = held < k ? held++ : k - 1;
    // a later id goes after every equal logit and after every NaN held
    while (at > 0 && (std::isnan(x) ? !std::isnan(values[at - 1]) : !std::isnan(values[at - 1]) && x > values[at - 1])) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
      --at;
    }
    values[at] = x;
    ids[at] = id;
  }

  // What a logit must pass to be looked at: above it (or NaN, or -inf while filling up).
  float floor() const { return held < k ? -INFINITY : values[k - 1]; }

  void look(const float* row, int64_t i) {
    if (takes(row[i])) put(row[i], static_cast<int32_t>(i));
  }
};

// A block of 64 (32) logits is looked at only where a lane is not at or below the floor
// (larger, or NaN), and then only those lanes, in order (the floor rises as they go in).
__attribute__((target("avx512f"))) void scan_avx512(Best& best, const float* row, int64_t n) {
  int64_t i = 0;
  __m512 floor = _mm512_set1_ps(best.floor());
  for (; i + 64 <= n; i += 64) {
    uint64_t lanes = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), floor, _CMP_NLE_UQ);
    lanes |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(row + i + 16), floor, _CMP_NLE_UQ)) << 16;
    lanes |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(row + i + 32), floor, _CMP_NLE_UQ)) << 32;
    lanes |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(row + i + 48), floor, _CMP_NLE_UQ)) << 48;
    if (!lanes) continue;
    for (; lanes; lanes &= lanes - 1) best.look(row, i + __builtin_ctzll(lanes));
    floor = _mm512_set1_ps(best.floor());
  }
  for (; i < n; ++i) best.look(row, i);
}

__attribute__((target("avx2"))) void scan_avx2(Best& best, const float* row, int64_t n) {
  int64_t i = 0;
  __m256 floor = _mm256_set1_ps(best.floor());
  for (; i + 32 <= n; i += 32) {
    uint32_t lanes = 0;
    for (int j = 0; j < 4; ++j)
      lanes |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i + 8 * j), floor, _CMP_NLE_UQ)))
               << (8 * j);
    if (!lanes) continue;
    for (; lanes; lanes &= lanes - 1) best.look(row, i + __builtin_ctz(lanes));
    floor = _mm256_set1_ps(best.floor());
  }
  for (; i < n; ++i) best.look(row, i);
}

}  // namespace

// Writes the k (1..) best of row[0..n) to ids / values, best first; returns how many there
// are (fewer than k when fewer than k logits are above -inf).
extern "C" int32_t realm_best_logits(const float* row, int64_t n, int32_t k, int32_t* ids, float* values) {
  Best best{ids, values, k};
  switch (realm::kernel_isa()) {
    case realm::Isa::avx512:
      scan_avx512(best, row, n);
      break;
    case realm::Isa::avx2:
      scan_avx2(best, row, n);
      break;
    default:
      for (int64_t i = 0; i < n; ++i) best.look(row, i);
  }
  return best.held;
}
