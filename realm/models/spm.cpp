// SentencePiece BPE as llama.cpp runs it (its `llm_tokenizer_spm`): a text fragment is
// split into UTF-8 characters, then the adjacent pair whose concatenation is the
// vocabulary token with the highest score is merged (the leftmost on a tie), again and
// again; a piece that is not a token at the end comes out as its bytes' `<0xNN>` tokens.
//
// Why a library of its own and not `tokenizers`' BPE: that needs the merges spelled out,
// every split of every token into two tokens (514,847 for gemma3's 262,144 tokens), which
// took 2 s to derive and build and 66 MiB to hold. This holds the vocabulary in one
// buffer and an open-addressed table of ids (a few MiB), built in milliseconds, and merges
// exactly as llama.cpp does, ties included. Plain C functions, called through ctypes.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Vocabulary {
  std::string texts;               // every token's text (UTF-8), back to back
  std::vector<uint32_t> offsets;   // token i is texts[offsets[i], offsets[i + 1])
  std::vector<float> scores;       // by id
  struct Slot {
    int32_t id = -1;      // the token hashed here, -1 for none
    uint32_t tag = 0;     // its hash's high half
    uint32_t length = 0;  // its text's bytes
  };
  std::vector<Slot> slots;  // open addressing, at most half full
  uint64_t slot_mask = 0;
  int32_t byte_tokens[256];        // the token that stands for each byte, -1 if none

  static uint64_t hash(const char* s, size_t n) { return std::hash<std::string_view>{}(std::string_view(s, n)); }

  int32_t find(const char* s, size_t n) const {
    const uint64_t h = hash(s, n);
    const auto tag = static_cast<uint32_t>(h >> 32);
    for (uint64_t i = h & slot_mask;; i = (i + 1) & slot_mask) {
      const Slot& slot = slots[i];
      if (slot.id < 0) return -1;
      if (slot.tag != tag || slot.length != n) continue;
      if (std::memcmp(texts.data() + offsets[slot.id], s, n) == 0) return slot.id;
    }
  }
};

struct Symbol {
  int32_t prev, next;  // neighbours in the fragment, -1 at its ends
  uint32_t start, n;   // bytes of the fragment it covers; n == 0 once merged into its left neighbour
};

struct Pair {
  float score;  // of the token the two symbols make together
  int32_t left, right;
  uint32_t size;  // bytes of the two together when queued: stale if either changed since
};

struct Worse {  // the heap's order: the highest score first, then the leftmost
  bool operator()(const Pair& a, const Pair& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

constexpr uint32_t kUtf8Length[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};

// One fragment's tokens into out: their count, or -1 if a byte has no token. `symbols` and
// `pairs` are scratch, kept from one fragment to the next.
int64_t encode_fragment(const Vocabulary& v, const char* text, int64_t n, std::vector<Symbol>& symbols,
                        std::vector<Pair>& pairs, int32_t* out) {
  symbols.clear();
  pairs.clear();
  for (int64_t at = 0; at < n;) {
    const uint32_t take = static_cast<uint32_t>(std::min<int64_t>(kUtf8Length[static_cast<unsigned char>(text[at]) >> 4], n - at));
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({index - 1, at + take == n ? -1 : index + 1, static_cast<uint32_t>(at), take});
    at += take;
  }
  auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t size = symbols[left].n + symbols[right].n;
    const int32_t id = v.find(text + symbols[left].start, size);
    if (id < 0) return;
    pairs.push_back({v.scores[id], left, right, size});
    std::push_heap(pairs.begin(), pairs.end(), Worse{});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) consider(i - 1, i);
  while (!pairs.empty()) {
    std::pop_heap(pairs.begin(), pairs.end(), Worse{});
    const Pair pair = pairs.back();
    pairs.pop_back();
    Symbol& left = symbols[pair.left];
    Symbol& right = symbols[pair.right];
    if (left.n == 0 || right.n == 0 || left.n + right.n != pair.size) continue;
    left.n += right.n;
    right.n = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = pair.left;
    consider(left.prev, pair.left);
    consider(pair.left, left.next);
  }
  int64_t count = 0;
  for (int32_t i = symbols.empty() ? -1 : 0; i != -1; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    const int32_t id = v.find(text + s.start, s.n);
    if (id >= 0) {
      out[count++] = id;
      continue;
    }
    for (uint32_t b = 0; b < s.n; ++b) {
      const int32_t byte = v.byte_tokens[static_cast<unsigned char>(text[s.start + b])];
      if (byte < 0) return -1;
      out[count++] = byte;
    }
  }
  return count;
}

}  // namespace

extern "C" {

// texts: n tokens' UTF-8 back to back, token i at [offsets[i], offsets[i + 1]); scores by
// id; unk: the unknown token's id, or -1. Texts must be distinct. Free with realm_spm_free.
void* realm_spm_new(const char* texts, const int64_t* offsets, const float* scores, int32_t n, int32_t unk) {
  auto* v = new Vocabulary;
  v->texts.assign(texts, static_cast<size_t>(offsets[n]));
  v->offsets.assign(offsets, offsets + n + 1);
  v->scores.assign(scores, scores + n);
  uint64_t size = 1;
  while (size < 2 * static_cast<uint64_t>(n)) size <<= 1;
  v->slots.assign(size, {});
  v->slot_mask = size - 1;
  for (int32_t id = 0; id < n; ++id) {
    const uint32_t begin = v->offsets[id];
    const uint32_t length = v->offsets[id + 1] - begin;
    const uint64_t h = Vocabulary::hash(v->texts.data() + begin, length);
    uint64_t i = h & v->slot_mask;
    while (v->slots[i].id >= 0) i = (i + 1) & v->slot_mask;
    v->slots[i] = {id, static_cast<uint32_t>(h >> 32), length};
  }
  for (int b = 0; b < 256; ++b) {  // llama.cpp's byte_to_token: <0xNN>, else the byte itself
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const char byte = static_cast<char>(b);
    int32_t id = v->find(name, 6);
    if (id < 0) id = v->find(&byte, 1);
    v->byte_tokens[b] = id >= 0 ? id : unk;
  }
  return v;
}

void realm_spm_free(void* vocabulary) { delete static_cast<Vocabulary*>(vocabulary); }

// The id of the token whose text is s[0, n), or -1.
int32_t realm_spm_find(const void* vocabulary, const char* s, int64_t n) {
  return static_cast<const Vocabulary*>(vocabulary)->find(s, static_cast<size_t>(n));
}

// Token i's text: its length, and its first byte in *text.
int64_t realm_spm_text(const void* vocabulary, int32_t id, const char** text) {
  const auto* v = static_cast<const Vocabulary*>(vocabulary);
  *text = v->texts.data() + v->offsets[id];
  return v->offsets[id + 1] - v->offsets[id];
}

// Tokens of fragments of text, each on its own: fragment f is text[bounds[f], bounds[f + 1])
// (spaces already written as U+2581). They go into out, which has room for bounds[count]
// tokens (no fragment makes more tokens than bytes), and ends[f] is where fragment f's
// end there. The number of tokens, or -1 if a byte has no token.
int64_t realm_spm_encode(const void* vocabulary, const char* text, const int64_t* bounds, int64_t count, int32_t* out,
                         int64_t* ends) {
  const auto* v = static_cast<const Vocabulary*>(vocabulary);
  std::vector<Symbol> symbols;
  std::vector<Pair> pairs;
  int64_t written = 0;
  for (int64_t f = 0; f < count; ++f) {
    const int64_t made = encode_fragment(*v, text + bounds[f], bounds[f + 1] - bounds[f], symbols, pairs, out + written);
    if (made < 0) return -1;
    written += made;
    ends[f] = written;
  }
  return written;
}

}  // extern "C"
