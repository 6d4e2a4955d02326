/*
 * default.c: Realm's default guest.
 *
 * One request: read it, find the model by name and check its id against the SHA-256 the
 * request carries, take the prompt's tokens from the request when the host made them
 * (`prompt_tokens`), else render the chat template (for `messages`) and tokenize; then loop: one
 * whole forward step on the host (logits of the last position land in this guest's
 * memory), sample here in WebAssembly, emit the token's text, stop on an end-of-generation
 * token, a stop string or max_tokens. With a `constraint` (a JSON schema, regex or grammar),
 * the host's grammar engine masks each step's logits and the guest tells it each token
 * (realm_grammar_consume); generation stops when the grammar is complete. A token's text is
 * asked of the host the first time the token comes up and kept: two host calls a token,
 * realm_emit and realm_forward, and a third the first time. It
 * mirrors the host's own loop (realm/engine/generation.py) and sampler
 * (realm/engine/sampling.py):
 *
 *   logit bias -> penalties (repeat over the last n tokens, presence, frequency) -> top-k ->
 *   top-p -> min-p -> temperature -> draw; temperature <= 0 is greedy (argmax, lowest index on ties,
 *   the first NaN if any, like torch.argmax).
 *
 * The sampler is the one docs/ABI.md specifies ("Sampling"): float64 throughout, one draw
 * a token from xoshiro256** seeded with the request's `seed` through splitmix64, so the
 * same seed gives the same tokens here as on the host, bit for bit.
 *
 * Text is streamed without splitting a UTF-8 character and without showing text that may
 * turn out to be the start of a stop string.
 */
#include "realm.h"
#include "realm_rt.h"

#define MAX_STOPS 64

#define MAX_LOGIT_BIAS 1024

typedef struct params {
    double temperature, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty;
    int64_t top_k, repeat_last_n, max_tokens;
    uint64_t seed;
    int32_t n_bias;
    int32_t *bias_ids; /* logit_bias: token ids and float32 biases, n_bias of each */
    float *bias;
} params;

typedef struct span {
    const char *s;
    size_t n;
} span;

/* --- text: growable byte strings and a streaming UTF-8 decoder --------------------------- */

static void *grow_copy(void *old, size_t old_n, size_t n) {
    void *p = rt_alloc(n);
    if (p && old) memcpy(p, old, old_n < n ? old_n : n);
    return p;
}

typedef struct text_buf {
    char *data;
    size_t len, cap;
} text_buf;

static int text_buf_reserve(text_buf *s, size_t extra) {
    if (s->len + extra <= s->cap) return 1;
    size_t cap = s->cap ? s->cap * 2 : 64;
    while (cap < s->len + extra) cap *= 2;
    char *p = (char *)grow_copy(s->data, s->len, cap);
    if (!p) return 0;
    s->data = p;
    s->cap = cap;
    return 1;
}

static int text_buf_add(text_buf *s, const char *p, size_t n) {
    if (!text_buf_reserve(s, n)) return 0;
    if (n) memcpy(s->data + s->len, p, n);
    s->len += n;
    return 1;
}

static int text_buf_cat(text_buf *s, const char *z) { return text_buf_add(s, z, rt_strlen(z)); }

static int text_buf_int(text_buf *s, int64_t v) {
    char buf[24];
    int i = 24;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do { buf[--i] = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) buf[--i] = '-';
    return text_buf_add(s, buf + i, (size_t)(24 - i));
}

/* Removes the first n bytes. */
static void text_buf_drop(text_buf *s, size_t n) {
    if (n >= s->len) { s->len = 0; return; }
    memmove(s->data, s->data + n, s->len - n);
    s->len -= n;
}

/* --- incremental UTF-8 decoding -------------------------------------------------------------
 * Bytes go in as tokens produce them; only whole characters come out. An invalid sequence
 * becomes U+FFFD per maximal invalid subpart, and what each push returns is what CPython's
 * incremental decoder (errors="replace") returns for the same chunk, so the stream is the
 * host's own (realm/models/tokenizer.py, StreamDecoder). */

typedef struct utf8_dec {
    unsigned char held[4];
    int n_held;
} utf8_dec;

static void utf8_fffd(text_buf *out) { text_buf_add(out, "\xEF\xBF\xBD", 3); }

static void utf8_run(utf8_dec *d, const unsigned char *b, size_t n, text_buf *out, int final) {
    size_t i = 0;
    while (i < n) {
        unsigned c = b[i];
        if (c < 0x80) { text_buf_add(out, (const char *)b + i, 1); i++; continue; }
        int need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if (c == 0xED) {
            need = 2;
            hi = 0x9F;
            if (!final && n - i == 2 && b[i + 1] >= 0xA0 && b[i + 1] <= 0xBF) {
                /* a truncated surrogate at the end: CPython's incremental decoder holds it
                 * (it can never become valid; the next bytes or the flush replace it) */
                d->n_held = 2;
                memcpy(d->held, b + i, 2);
                break;
            }
        }
        else if (c >= 0xE1 && c <= 0xEF) need = 2;
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else { utf8_fffd(out); i++; continue; }
        int j = 1, bad = 0;
        for (; j <= need; j++) {
            if (i + (size_t)j >= n) {
                if (final) { utf8_fffd(out); i = n; }
                else { d->n_held = (int)(n - i); memcpy(d->held, b + i, n - i); i = n; }
                bad = 2;
                break;
            }
            unsigned x = b[i + (size_t)j];
            unsigned l = j == 1 ? lo : 0x80, h = j == 1 ? hi : 0xBF;
            if (x < l || x > h) { bad = 1; break; }
        }
        if (bad == 2) break;
        if (bad == 1) { utf8_fffd(out); i += (size_t)j; continue; }
        text_buf_add(out, (const char *)b + i, (size_t)need + 1);
        i += (size_t)need + 1;
    }
}

/* Decode `n` more bytes into `out` (appending). */
static void utf8_push(utf8_dec *d, const char *bytes, size_t n, text_buf *out) {
    if (!d->n_held) {
        utf8_run(d, (const unsigned char *)bytes, n, out, 0);
        return;
    }
    unsigned char small[260];
    size_t held = (size_t)d->n_held;
    unsigned char *tmp = held + n <= sizeof small ? small : (unsigned char *)rt_alloc(held + n);
    d->n_held = 0;
    if (!tmp) { /* out of memory: give up on the held character */
        utf8_fffd(out);
        utf8_run(d, (const unsigned char *)bytes, n, out, 0);
        return;
    }
    memcpy(tmp, d->held, held);
    memcpy(tmp + held, bytes, n);
    utf8_run(d, tmp, held + n, out, 0);
}

/* The end: a character left unfinished becomes U+FFFD. */
static void utf8_flush(utf8_dec *d, text_buf *out) {
    if (d->n_held) {
        unsigned char tmp[4];
        size_t n = (size_t)d->n_held;
        memcpy(tmp, d->held, n);
        d->n_held = 0;
        utf8_run(d, tmp, n, out, 1);
    }
}

/* --- errors ------------------------------------------------------------------------------ */

static int32_t fail(int32_t code, const char *what, const char *detail) {
    text_buf m = {0};
    text_buf_cat(&m, "default guest: ");
    text_buf_cat(&m, what);
    if (detail) text_buf_cat(&m, detail);
    realm_log(REALM_LOG_ERROR, m.data ? m.data : what, m.data ? m.len : rt_strlen(what));
    return code;
}

static int32_t fail_n(int32_t code, const char *what, int64_t a, const char *mid, int64_t b) {
    text_buf m = {0};
    text_buf_cat(&m, "default guest: ");
    text_buf_cat(&m, what);
    text_buf_int(&m, a);
    if (mid) {
        text_buf_cat(&m, mid);
        text_buf_int(&m, b);
    }
    realm_log(REALM_LOG_ERROR, m.data ? m.data : what, m.data ? m.len : rt_strlen(what));
    return code;
}

/* --- random numbers: xoshiro256** seeded through splitmix64 -------------------------------- */

typedef struct rng {
    uint64_t s[4];
} rng;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_seed(rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* uniform in [0, 1) with 53 random bits */
static double rng_uniform(rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

/* --- sorting -------------------------------------------------------------------------------- */

static void sift_i32(int32_t *a, size_t start, size_t n) {
    size_t root = start;
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && a[child] < a[child + 1]) child++;
        if (a[root] >= a[child]) return;
        int32_t t = a[root]; a[root] = a[child]; a[child] = t;
        root = child;
    }
}

static void sort_i32(int32_t *a, size_t n) {
    if (n < 2) return;
    for (size_t i = n / 2; i-- > 0;) sift_i32(a, i, n);
    for (size_t end = n - 1; end > 0; end--) {
        int32_t t = a[0]; a[0] = a[end]; a[end] = t;
        sift_i32(a, 0, end);
    }
}

/* The sampler's order: larger logit first, the lower token id first on equal logits (no
 * NaN reaches it). (v[a], ix[a]) comes after (v[b], ix[b]) in that order. */
static int after(const float *v, const int32_t *ix, size_t a, size_t b) {
    return v[a] < v[b] || (v[a] == v[b] && ix[a] > ix[b]);
}

/* (val, idx) pairs: a heap with the pair that comes last at the root, so heapsort leaves
 * them in the order */
static void sift_pairs(float *v, int32_t *ix, size_t start, size_t n) {
    size_t root = start;
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && after(v, ix, child + 1, child)) child++;
        if (after(v, ix, root, child)) return;
        float tv = v[root]; v[root] = v[child]; v[child] = tv;
        int32_t ti = ix[root]; ix[root] = ix[child]; ix[child] = ti;
        root = child;
    }
}

static void heap_to_order(float *v, int32_t *ix, size_t n) {
    for (size_t end = n; end-- > 1;) {
        float tv = v[0]; v[0] = v[end]; v[end] = tv;
        int32_t ti = ix[0]; ix[0] = ix[end]; ix[end] = ti;
        sift_pairs(v, ix, 0, end);
    }
}

static void sort_pairs(float *v, int32_t *ix, size_t n) {
    for (size_t i = n / 2; i-- > 0;) sift_pairs(v, ix, i, n);
    heap_to_order(v, ix, n);
}

/* --- the sampler ------------------------------------------------------------------------------
 * docs/ABI.md ("Sampling") is the specification; realm/engine/sampling.py is the same
 * algorithm on the host, bit for bit. */

typedef struct sampler {
    params p;
    rng r;
    int32_t vocab;
    int32_t *idx; /* candidates: ids and logits in the order, vocab entries each */
    float *val;
    int32_t *ids; /* top-k candidates' ids, ascending (for the total) */
    double *cum;  /* cumulative weights of the kept candidates */
    int32_t *recent; /* the last repeat_last_n tokens, sorted to count them */
} sampler;

static int sampler_init(sampler *s, const params *p, int32_t vocab) {
    s->p = *p;
    s->vocab = vocab;
    rng_seed(&s->r, p->seed);
    s->idx = s->ids = s->recent = NULL;
    s->val = NULL;
    s->cum = NULL;
    if (p->temperature > 0) { /* candidates: the first top_k, or every token */
        size_t n = p->top_k > 0 && p->top_k < vocab ? (size_t)p->top_k : (size_t)vocab;
        s->idx = (int32_t *)rt_alloc(n * sizeof(int32_t));
        s->val = (float *)rt_alloc(n * sizeof(float));
        s->ids = (int32_t *)rt_alloc(n * sizeof(int32_t));
        s->cum = (double *)rt_alloc(n * sizeof(double));
        if (!s->idx || !s->val || !s->ids || !s->cum) return 0;
    }
    if (p->repeat_last_n > 0) {
        s->recent = (int32_t *)rt_alloc((size_t)p->repeat_last_n * sizeof(int32_t));
        if (!s->recent) return 0;
    }
    return 1;
}

/* Each token among the last repeat_last_n, counted c times: in double from its float32
 * logit x, (x <= 0 ? x * repeat : x / repeat) - c * frequency - presence, rounded to float32. */
static void penalise(sampler *s, float *logits, const int32_t *history, size_t n_history) {
    const params *p = &s->p;
    if (p->repeat_last_n == 0 || n_history == 0) return;
    if (p->repeat_penalty == 1.0 && p->presence_penalty == 0.0 && p->frequency_penalty == 0.0) return;
    size_t n = n_history < (size_t)p->repeat_last_n ? n_history : (size_t)p->repeat_last_n;
    memcpy(s->recent, history + (n_history - n), n * sizeof(int32_t));
    sort_i32(s->recent, n);
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s->recent[j] == s->recent[i]) j++;
        int32_t id = s->recent[i];
        if (id >= 0 && id < s->vocab) {
            double x = logits[id];
            x = x <= 0 ? x * p->repeat_penalty : x / p->repeat_penalty;
            logits[id] = (float)(x - (double)(j - i) * p->frequency_penalty - p->presence_penalty);
        }
        i = j;
    }
}

/* The index of the largest value, the lowest one on ties, or of the first NaN if there is
 * one (torch.argmax's answer). Eight lanes of SIMD keep each lane's first maximum. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static int32_t first_nan(const float *x, int32_t n) {
    for (int32_t j = 0; j < n; j++)
        if (x[j] != x[j]) return j;
    return -1;
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t i = 1, best_i = 0;
    float best = x[0];
    if (best != best) return 0;
    if (n >= 16) {
        v4f m0, m1, v0, v1;
        v4i i0 = {0, 1, 2, 3}, i1 = {4, 5, 6, 7}, b0 = i0, b1 = i1, step = {8, 8, 8, 8};
        v4i nan = {0, 0, 0, 0};
        __builtin_memcpy(&m0, x, 16);
        __builtin_memcpy(&m1, x + 4, 16);
        nan |= (m0 != m0) | (m1 != m1);
        for (i = 8; i + 8 <= n; i += 8) {
            __builtin_memcpy(&v0, x + i, 16);
            __builtin_memcpy(&v1, x + i + 4, 16);
            i0 += step;
            i1 += step;
            v4i g0 = v0 > m0, g1 = v1 > m1;
            nan |= (v0 != v0) | (v1 != v1);
            m0 = (v4f)(((v4i)v0 & g0) | ((v4i)m0 & ~g0));
            m1 = (v4f)(((v4i)v1 & g1) | ((v4i)m1 & ~g1));
            b0 = (i0 & g0) | (b0 & ~g0);
            b1 = (i1 & g1) | (b1 & ~g1);
        }
        if (nan[0] | nan[1] | nan[2] | nan[3]) return first_nan(x, n);
        for (int k = 0; k < 8; k++) {
            float v = k < 4 ? m0[k] : m1[k - 4];
            int32_t bi = k < 4 ? b0[k] : b1[k - 4];
            if (v > best || (v == best && bi < best_i)) {
                best = v;
                best_i = bi;
            }
        }
    }
    for (; i < n; i++) {
        float v = x[i];
        if (v != v) return first_nan(x, n);
        if (v > best) {
            best = v;
            best_i = i;
        }
    }
    return best_i;
}

/* The first k tokens in the order, in the order, into s->val / s->idx. */
static size_t top_k(sampler *s, const float *logits, size_t k) {
    float *v = s->val;
    int32_t *ix = s->idx;
    size_t n = 0;
    for (int32_t i = 0; i < s->vocab; i++) {
        float x = logits[i];
        if (n < k) {
            v[n] = x;
            ix[n] = i;
            n++;
            if (n == k) /* heapify */
                for (size_t j = k / 2; j-- > 0;) sift_pairs(v, ix, j, k);
        } else if (x > v[0]) { /* equal logits: the later id comes after, so it stays out */
            v[0] = x;
            ix[0] = i;
            sift_pairs(v, ix, 0, k);
        }
    }
    heap_to_order(v, ix, n);
    return n;
}

static int32_t draw(sampler *s, size_t n, double m, double total);

/* The top-k candidates s->val / s->idx[0..n), in the order: min-p keeps those with weight
 * e >= min_p, then draw(). */
static int32_t draw_top_k(sampler *s, size_t n, double m, double total) {
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (s->p.min_p > 0.0 && !(rt_exp((double)s->val[i] - m) >= s->p.min_p)) continue;
        s->val[kept] = s->val[i];
        s->idx[kept] = s->idx[i];
        kept++;
    }
    return draw(s, kept, m, total);
}

static int32_t sample(sampler *s, float *logits, const int32_t *history, size_t n_history) {
    const params *p = &s->p;
    int32_t V = s->vocab;
    for (int32_t i = 0; i < p->n_bias; i++) logits[p->bias_ids[i]] += p->bias[i]; /* one float32 addition */
    penalise(s, logits, history, n_history);
    if (p->temperature <= 0) return argmax(logits, V);
    for (int32_t i = 0; i < V; i++)
        if (logits[i] != logits[i]) logits[i] = -__builtin_inf();

    /* candidates: the first top_k in the order, or every token; m, their largest logit */
    int by_top_k = p->top_k > 0 && p->top_k < V;
    size_t n = by_top_k ? top_k(s, logits, (size_t)p->top_k) : 0;
    int32_t first = by_top_k ? s->idx[0] : argmax(logits, V);
    double m = logits[first];
    if (!(m > -__builtin_inf() && m < __builtin_inf())) return first;

    /* weights e = exp(x - m); total: their sum in token id order (for top-p); min-p keeps
     * the candidates with e >= min_p, then they are put in the order */
    double total = 0.0;
    if (by_top_k) {
        if (p->top_p < 1.0) {
            memcpy(s->ids, s->idx, n * sizeof(int32_t));
            sort_i32(s->ids, n);
            for (size_t i = 0; i < n; i++) total += rt_exp((double)logits[s->ids[i]] - m);
        }
        return draw_top_k(s, n, m, total);
    }
    for (int32_t i = 0; i < V; i++) {
        double e = rt_exp((double)logits[i] - m);
        total += e;
        if (p->min_p > 0.0 && !(e >= p->min_p)) continue;
        s->val[n] = logits[i];
        s->idx[n] = i;
        n++;
    }
    sort_pairs(s->val, s->idx, n);
    return draw(s, n, m, total);
}

/* How many of a step's best tokens sampling looks at, where that is at most REALM_MAX_TOP
 * and nothing (a logit bias, a penalty) can bring a token in from below them: 1 when greedy,
 * else top_k; 0 for the whole row. realm/engine/sampling.py has the same rule. */
static int32_t top_candidates(const params *p, int32_t vocab) {
    if (p->n_bias > 0) return 0;
    if (p->repeat_last_n > 0 && (p->repeat_penalty != 1.0 || p->presence_penalty != 0.0 || p->frequency_penalty != 0.0))
        return 0;
    if (p->temperature <= 0) return 1;
    return p->top_k > 0 && p->top_k <= REALM_MAX_TOP && p->top_k < vocab ? (int32_t)p->top_k : 0;
}

/* The token sample() would take from the whole row, taken from the step's n best tokens
 * (realm_forward_top: best first, equal logits the lower id first; top_candidates() of
 * them). A NaN logit counts as -inf, as in sample(); but the tokens below the n best are
 * not known, so on a row holding NaN (a broken model) sampling can differ from the row's. */
static int32_t sample_top(sampler *s, const int32_t *ids, const float *logits, int32_t n) {
    if (n <= 0) return 0; /* every logit -inf: sample() takes the first token */
    if (s->p.temperature <= 0) return ids[0];
    size_t kept = 0;
    for (int32_t i = 0; i < n; i++)
        if (logits[i] == logits[i]) {
            s->val[kept] = logits[i];
            s->idx[kept] = ids[i];
            kept++;
        }
    if (kept == 0) return ids[0];
    double m = s->val[0], total = 0.0;
    if (!(m > -__builtin_inf() && m < __builtin_inf())) return s->idx[0];
    if (s->p.top_p < 1.0) { /* in token id order, as sample() sums them */
        memcpy(s->ids, s->idx, kept * sizeof(int32_t));
        sort_i32(s->ids, kept);
        for (size_t i = 0; i < kept; i++)
            for (size_t j = 0; j < kept; j++)
                if (s->idx[j] == s->ids[i]) {
                    total += rt_exp((double)s->val[j] - m);
                    break;
                }
    }
    return draw_top_k(s, kept, m, total);
}

/* The rest of sampling once the candidates are s->val / s->idx[0..n), in the order, m their
 * largest logit and total the sum of all the weights in token id order (for top-p): top-p,
 * temperature and one draw. */
static int32_t draw(sampler *s, size_t n, double m, double total) {
    const params *p = &s->p;
    /* top-p: the shortest prefix whose weights reach top_p * total */
    size_t keep = n;
    if (p->top_p < 1.0) {
        double threshold = p->top_p * total, cum = 0.0;
        for (size_t i = 0; i < n; i++) {
            cum += rt_exp((double)s->val[i] - m);
            if (cum >= threshold) {
                keep = i + 1;
                break;
            }
        }
    }
    /* temperature, then one draw: the first kept candidate whose cumulative weight exceeds
     * u * the sum of the weights */
    double sum = 0.0;
    for (size_t i = 0; i < keep; i++) {
        sum += rt_exp(((double)s->val[i] - m) / p->temperature);
        s->cum[i] = sum;
    }
    double target = rng_uniform(&s->r) * sum;
    for (size_t i = 0; i < keep; i++)
        if (target < s->cum[i]) return s->idx[i];
    return s->idx[keep - 1];
}

/* --- stop strings -------------------------------------------------------------------------- */

static size_t find(const char *h, size_t hn, const char *nd, size_t nn) {
    if (nn > hn) return (size_t)-1;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == nd[0] && rt_memeq(h + i, nd, nn)) return i;
    return (size_t)-1;
}

/* How many bytes of `text` can be shown; *stopped when a stop string was reached (then the
 * text before it is shown and nothing is held). Otherwise the longest ending of `text` that
 * begins a stop string is held back (whole characters only: text is valid UTF-8). */
static size_t split_at_stop(const text_buf *text, const span *stops, int n_stops, int *stopped) {
    size_t best = (size_t)-1;
    for (int i = 0; i < n_stops; i++) {
        if (!stops[i].n) continue;
        size_t at = find(text->data, text->len, stops[i].s, stops[i].n);
        if (at < best) best = at;
    }
    if (best != (size_t)-1) {
        *stopped = 1;
        return best;
    }
    size_t hold = 0;
    for (int i = 0; i < n_stops; i++) {
        const span *s = &stops[i];
        if (s->n < 2) continue;
        size_t n = s->n - 1 < text->len ? s->n - 1 : text->len;
        for (; n > 0; n--) {
            if (((unsigned char)s->s[n] & 0xC0) == 0x80) continue; /* not a character boundary */
            if (rt_memeq(text->data + text->len - n, s->s, n)) {
                if (n > hold) hold = n;
                break;
            }
        }
    }
    return text->len - hold;
}

/* --- the request ----------------------------------------------------------------------------- */

typedef struct request {
    char *model;
    size_t model_len;
    uint8_t sha256[32];
    const char *messages; /* raw JSON of the messages array, or NULL */
    size_t messages_len;
    char *prompt;
    size_t prompt_len;
    params p;
    span stops[MAX_STOPS];
    int n_stops;
    const char *constraint; /* raw JSON of the constraint object, or NULL */
    size_t constraint_len;
    int32_t top_logprobs; /* -1: no log-probabilities asked for */
} request;

/* JSON through realm_rt.h: a field's value (NULL span if absent or null) and its reading */
static rt_span field(const char *json, size_t n, const char *key) {
    rt_span v;
    if (rt_json_get(json, n, key, &v) != 1 || rt_json_is_null(v)) v.p = NULL, v.len = 0;
    return v;
}

static char *string_of(rt_span v, size_t *len) {
    if (!v.p || v.len < 2 || v.p[0] != '"') return NULL;
    char *out = (char *)rt_alloc(v.len + 1);
    if (!out) return NULL;
    int64_t n = rt_json_string(v, out);
    if (n < 0) return NULL;
    out[n] = 0;
    *len = (size_t)n;
    return out;
}

static int u64_of(rt_span v, uint64_t *out) { /* a non-negative integer, exactly */
    uint64_t x = 0;
    if (!v.len) return 0;
    for (size_t i = 0; i < v.len; i++) {
        char c = v.p[i];
        if (c < '0' || c > '9') return 0;
        if (x > (UINT64_MAX - (uint64_t)(c - '0')) / 10) return 0;
        x = x * 10 + (uint64_t)(c - '0');
    }
    *out = x;
    return 1;
}

static int32_t number(const char *json, size_t n, const char *key, double dflt, double *out) {
    rt_span v = field(json, n, key);
    if (!v.p) { *out = dflt; return 0; }
    if (rt_json_number(v, out) != 0) return fail(REALM_E_INVALID_ARGUMENT, "request field is not a number: ", key);
    return 0;
}

static int32_t integer(const char *json, size_t n, const char *key, int64_t dflt, int64_t *out) {
    double d;
    int32_t rc = number(json, n, key, (double)dflt, &d);
    if (rc) return rc;
    if (!(d >= -9.0e18 && d <= 9.0e18) || d != (double)(int64_t)d)
        return fail(REALM_E_INVALID_ARGUMENT, "request field is not an integer: ", key);
    *out = (int64_t)d;
    return 0;
}

/* One [token id, bias] pair of "logit_bias" at s[i..e): 1 if well formed. */
static int bias_pair(const char *s, size_t e, size_t i, uint64_t *id, double *bias) {
    if (s[i] != '[') return 0;
    i = rt_json_ws(s, e, i + 1);
    size_t end = rt_json_skip(s, e, i);
    if (!end || !u64_of((rt_span){s + i, end - i}, id)) return 0;
    i = rt_json_ws(s, e, end);
    if (i >= e || s[i] != ',') return 0;
    i = rt_json_ws(s, e, i + 1);
    end = rt_json_skip(s, e, i);
    if (!end || rt_json_number((rt_span){s + i, end - i}, bias) != 0) return 0;
    i = rt_json_ws(s, e, end);
    return i < e && s[i] == ']' && rt_json_ws(s, e, i + 1) == e;
}

/* "logit_bias": a list of [token id, bias] pairs, bias in [-100, 100], into p (the ids are
 * checked against the vocabulary once the model is known). */
static int32_t parse_logit_bias(rt_span v, params *p) {
    const char *bad = "\"logit_bias\" must be a list of [token id, bias] pairs, bias in [-100, 100]";
    p->n_bias = 0;
    if (!v.p) return 0;
    if (v.p[0] != '[') return fail(REALM_E_INVALID_ARGUMENT, bad, NULL);
    p->bias_ids = (int32_t *)rt_alloc(MAX_LOGIT_BIAS * sizeof(int32_t));
    p->bias = (float *)rt_alloc(MAX_LOGIT_BIAS * sizeof(float));
    if (!p->bias_ids || !p->bias) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for logit_bias", NULL);
    size_t i = rt_json_ws(v.p, v.len, 1);
    while (i < v.len && v.p[i] != ']') {
        size_t e = rt_json_skip(v.p, v.len, i);
        uint64_t id;
        double bias;
        if (!e || !bias_pair(v.p, e, i, &id, &bias) || !(bias >= -100 && bias <= 100) || id > INT32_MAX)
            return fail(REALM_E_INVALID_ARGUMENT, bad, NULL);
        if (p->n_bias == MAX_LOGIT_BIAS)
            return fail_n(REALM_E_LIMIT_EXCEEDED, "too many logit_bias entries; the most is ", MAX_LOGIT_BIAS, NULL, 0);
        p->bias_ids[p->n_bias] = (int32_t)id;
        p->bias[p->n_bias++] = (float)bias;
        i = rt_json_ws(v.p, v.len, e);
        if (i < v.len && v.p[i] == ',') i = rt_json_ws(v.p, v.len, i + 1);
        else if (i >= v.len || v.p[i] != ']') return fail(REALM_E_INVALID_ARGUMENT, bad, NULL);
    }
    return 0;
}

static int32_t parse_request(const char *json, size_t len, request *r) {
    rt_span v;
    int32_t rc;
    memset(r, 0, sizeof *r);
    if (rt_json_get(json, len, "model", &v) < 0)
        return fail(REALM_E_INVALID_ARGUMENT, "the request is not a well-formed JSON object", NULL);

    if (!(r->model = string_of(field(json, len, "model"), &r->model_len)))
        return fail(REALM_E_INVALID_ARGUMENT, "the request names no model (\"model\")", NULL);
    size_t hex_len = 0;
    char *hex = string_of(field(json, len, "model_sha256"), &hex_len);
    if (!hex || hex_len != 64)
        return fail(REALM_E_INVALID_ARGUMENT, "the request has no model_sha256 (64 hex digits)", NULL);
    for (int i = 0; i < 32; i++) {
        int hi = rt_hex(hex[2 * i]), lo = rt_hex(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return fail(REALM_E_INVALID_ARGUMENT, "model_sha256 is not hex", NULL);
        r->sha256[i] = (uint8_t)(hi << 4 | lo);
    }

    v = field(json, len, "messages");
    if (v.p) {
        if (v.p[0] != '[') return fail(REALM_E_INVALID_ARGUMENT, "\"messages\" is not an array", NULL);
        r->messages = v.p;
        r->messages_len = v.len;
    } else if (!(r->prompt = string_of(field(json, len, "prompt"), &r->prompt_len))) {
        return fail(REALM_E_INVALID_ARGUMENT, "the request has neither \"prompt\" nor \"messages\"", NULL);
    }

    params *p = &r->p;
    if ((rc = integer(json, len, "max_tokens", 128, &p->max_tokens)) ||
        (rc = number(json, len, "temperature", 0.8, &p->temperature)) ||
        (rc = integer(json, len, "top_k", 40, &p->top_k)) ||
        (rc = number(json, len, "top_p", 0.95, &p->top_p)) ||
        (rc = number(json, len, "min_p", 0.05, &p->min_p)) ||
        (rc = number(json, len, "repeat_penalty", 1.0, &p->repeat_penalty)) ||
        (rc = integer(json, len, "repeat_last_n", 64, &p->repeat_last_n)) ||
        (rc = number(json, len, "presence_penalty", 0.0, &p->presence_penalty)) ||
        (rc = number(json, len, "frequency_penalty", 0.0, &p->frequency_penalty)))
        return rc;
    v = field(json, len, "seed");
    p->seed = 0;
    if (v.p && !u64_of(v, &p->seed)) return fail(REALM_E_INVALID_ARGUMENT, "seed must be a non-negative integer", NULL);

    if (p->max_tokens < 0) return fail(REALM_E_INVALID_ARGUMENT, "max_tokens must be >= 0", NULL);
    if (!(p->temperature >= 0)) return fail(REALM_E_INVALID_ARGUMENT, "temperature must be >= 0", NULL);
    if (p->top_k < 0) return fail(REALM_E_INVALID_ARGUMENT, "top_k must be >= 0", NULL);
    if (!(p->top_p > 0 && p->top_p <= 1)) return fail(REALM_E_INVALID_ARGUMENT, "top_p must be in (0, 1]", NULL);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return fail(REALM_E_INVALID_ARGUMENT, "min_p must be in [0, 1]", NULL);
    if (!(p->repeat_penalty > 0)) return fail(REALM_E_INVALID_ARGUMENT, "repeat_penalty must be > 0", NULL);
    if (p->repeat_last_n < 0 || p->repeat_last_n > (1 << 24))
        return fail(REALM_E_INVALID_ARGUMENT, "repeat_last_n must be in 0..16777216", NULL);
    if (!(p->presence_penalty >= -2 && p->presence_penalty <= 2))
        return fail(REALM_E_INVALID_ARGUMENT, "presence_penalty must be in [-2, 2]", NULL);
    if (!(p->frequency_penalty >= -2 && p->frequency_penalty <= 2))
        return fail(REALM_E_INVALID_ARGUMENT, "frequency_penalty must be in [-2, 2]", NULL);

    v = field(json, len, "constraint");
    if (v.p) {
        if (v.p[0] != '{') return fail(REALM_E_INVALID_ARGUMENT, "\"constraint\" is not an object", NULL);
        r->constraint = v.p;
        r->constraint_len = v.len;
    }

    v = field(json, len, "stop");
    if (v.p && v.p[0] == '"') { /* a single string is accepted too */
        size_t n;
        char *s = string_of(v, &n);
        if (!s) return fail(REALM_E_INVALID_ARGUMENT, "\"stop\" is malformed", NULL);
        r->stops[r->n_stops++] = (span){s, n};
    } else if (v.p) {
        if (v.p[0] != '[') return fail(REALM_E_INVALID_ARGUMENT, "\"stop\" must be a list of strings", NULL);
        size_t i = rt_json_ws(v.p, v.len, 1);
        while (i < v.len && v.p[i] != ']') {
            size_t e = rt_json_skip(v.p, v.len, i), n;
            char *s = e ? string_of((rt_span){v.p + i, e - i}, &n) : NULL;
            if (!s) return fail(REALM_E_INVALID_ARGUMENT, "\"stop\" must be a list of strings", NULL);
            if (r->n_stops == MAX_STOPS) return fail_n(REALM_E_LIMIT_EXCEEDED, "too many stop strings; the most is ", MAX_STOPS, NULL, 0);
            r->stops[r->n_stops++] = (span){s, n};
            i = rt_json_ws(v.p, v.len, e);
            if (i < v.len && v.p[i] == ',') i = rt_json_ws(v.p, v.len, i + 1);
        }
    }

    int64_t n_top;
    if ((rc = integer(json, len, "top_logprobs", 0, &n_top))) return rc;
    if (n_top < 0 || n_top > REALM_MAX_TOP_LOGPROBS)
        return fail_n(REALM_E_INVALID_ARGUMENT, "top_logprobs must be in 0..", REALM_MAX_TOP_LOGPROBS, NULL, 0);
    v = field(json, len, "logprobs");
    r->top_logprobs = v.len == 4 && rt_memeq(v.p, "true", 4) ? (int32_t)n_top : -1;
    return parse_logit_bias(field(json, len, "logit_bias"), p);
}

/* --- the prompt's tokens ------------------------------------------------------------------------ */

#define MAX_END_TOKENS 64

typedef struct model_ref {
    int32_t id, vocab, ctx;
    int add_space_prefix; /* the tokenizer's leading space, dropped from the first token's text */
    int32_t n_ends;       /* the tokens that end generation (the info's eot_ids); -1: ask the host */
    int32_t ends[MAX_END_TOKENS];
} model_ref;

/* A JSON array of token ids, each below `below`, into out (room for `cap` ids): the count;
 * -1 if v is not such an array, -2 if an id is `below` or more (*bad: that id), -3 if it
 * holds more than `cap`. */
static int32_t id_array(rt_span v, uint64_t below, int32_t *out, int32_t cap, uint64_t *bad) {
    if (!v.p || v.p[0] != '[') return -1;
    int32_t n = 0;
    size_t i = rt_json_ws(v.p, v.len, 1);
    while (i < v.len && v.p[i] != ']') {
        size_t e = rt_json_skip(v.p, v.len, i);
        uint64_t id;
        if (!e || !u64_of((rt_span){v.p + i, e - i}, &id)) return -1;
        if (id >= below) {
            *bad = id;
            return -2;
        }
        if (n == cap) return -3;
        out[n++] = (int32_t)id;
        i = rt_json_ws(v.p, v.len, e);
        if (i < v.len && v.p[i] == ',') i = rt_json_ws(v.p, v.len, i + 1);
        else if (i >= v.len || v.p[i] != ']') return -1;
    }
    return n;
}

/* The info's `eot_ids` into m->ends; n_ends stays -1 if it is absent, malformed or longer
 * than fits. */
static void end_tokens(rt_span v, model_ref *m) {
    uint64_t bad;
    int32_t n = id_array(v, (uint64_t)m->vocab, m->ends, MAX_END_TOKENS, &bad);
    if (n >= 0) m->n_ends = n;
}

/* The model the request names, by name from the host, its identity checked against the
 * request's SHA-256. */
static int32_t model_open(const request *req, model_ref *m) {
    realm_model_info info;
    int32_t id = realm_store_model_by_name(req->model, req->model_len, &info);
    if (id < 0) return id;
    int32_t rc = realm_validate_model_id(id, req->sha256);
    if (rc < 0) return rc;
    *m = (model_ref){id, (int32_t)info.vocab_size, (int32_t)info.context_length, 0, -1, {0}};
    int32_t info_len = realm_get_model_info(id, NULL, 0);
    if (info_len > 0) {
        char *info_json = (char *)rt_alloc((size_t)info_len);
        if (info_json && realm_get_model_info(id, info_json, (size_t)info_len) == info_len) {
            rt_span flag = field(info_json, (size_t)info_len, "add_space_prefix");
            m->add_space_prefix = flag.len == 4 && rt_memeq(flag.p, "true", 4);
            end_tokens(field(info_json, (size_t)info_len, "eot_ids"), m);
        }
    }
    return 0;
}

static int32_t prompt_checked(int32_t n, const model_ref *m) {
    if (n == 0) return fail(REALM_E_INVALID_ARGUMENT, "the prompt is empty", NULL);
    if (n >= m->ctx) return fail_n(REALM_E_CONTEXT_OVERFLOW, "the prompt has ", n, " tokens; the context holds ", m->ctx);
    return n;
}

/* The request's `prompt_tokens` (an array of token ids, made by the host by the same prompt
 * rule) into out, which holds ctx + 1 ids: the count, or an error. Ids must be in the
 * vocabulary and fewer than the context holds. */
static int32_t tokens_given(rt_span v, const model_ref *m, int32_t *out) {
    uint64_t bad = 0;
    int32_t n = id_array(v, (uint64_t)m->vocab, out, m->ctx, &bad);
    if (n == -1) return fail(REALM_E_INVALID_ARGUMENT, "\"prompt_tokens\" must be a list of token ids", NULL);
    if (n == -2)
        return fail_n(REALM_E_INVALID_ARGUMENT, "prompt token ", (int64_t)(bad > INT64_MAX ? INT64_MAX : bad),
                      " is outside the vocabulary of ", m->vocab);
    if (n == -3) /* one more than fits: the count is known to be too many */
        return fail_n(REALM_E_CONTEXT_OVERFLOW, "the prompt has more than ", m->ctx, " tokens; the context holds ", m->ctx);
    return prompt_checked(n, m);
}

/* The prompt text (the chat template's rendering of the messages, or the prompt) tokenized
 * by the host into *out, allocated here: the count, or an error. */
static int32_t tokens_of_text(const request *req, const model_ref *m, int32_t **out) {
    const char *text = req->prompt;
    size_t text_len = req->prompt_len;
    if (req->messages) {
        int32_t n = realm_chat_template(m->id, req->messages, req->messages_len, NULL, 0);
        if (n < 0) return n;
        char *rendered = (char *)rt_alloc((size_t)n + 1);
        if (!rendered) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the prompt", NULL);
        int32_t rc = realm_chat_template(m->id, req->messages, req->messages_len, rendered, (size_t)n);
        if (rc < 0) return rc;
        text = rendered;
        text_len = (size_t)n;
    }
    /* at most one token per byte, plus BOS */
    size_t cap = (text_len + 2 > (size_t)m->ctx ? text_len + 2 : (size_t)m->ctx) + 1;
    if (!(*out = (int32_t *)rt_alloc(cap * sizeof(int32_t))))
        return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the tokens", NULL);
    int32_t n = realm_tokenize(m->id, text, text_len, REALM_TOKENIZE_ADD_BOS | REALM_TOKENIZE_PARSE_SPECIAL, *out, cap);
    if (n < 0) return n;
    if ((size_t)n > cap) return fail(REALM_E_INTERNAL, "more tokens than bytes in the prompt", NULL);
    return prompt_checked(n, m);
}

/* The prompt's tokens into *history (allocated here, room for the whole context after
 * them): the request's `prompt_tokens` when present, else the prompt tokenized. Returns
 * the count, or an error. */
static int32_t prompt_tokens(const char *json, size_t len, const request *req, const model_ref *m, int32_t **history) {
    rt_span given = field(json, len, "prompt_tokens");
    if (!given.p) return tokens_of_text(req, m, history);
    if (!(*history = (int32_t *)rt_alloc(((size_t)m->ctx + 1) * sizeof(int32_t))))
        return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the tokens", NULL);
    return tokens_given(given, m, *history);
}

/* --- the vocabulary, token by token -----------------------------------------------------------
 * A token's bytes are asked of the host the first time the token comes up (realm_token_bytes:
 * one host call) and kept in an open-addressed table; whether it ends generation comes from
 * the model's info (realm_token_is_end if the info has no list). A request meets a few
 * hundred distinct tokens; the whole table (realm_vocab) would put 3.3 MB of gemma3's
 * 262,144 tokens into every guest's memory. */

typedef struct {
    int32_t token; /* -1: an empty slot */
    int32_t end;   /* 1 if the token ends generation */
    size_t at, n;  /* its bytes: bytes.data[at .. at + n) */
} known_token;

typedef struct {
    const model_ref *m;
    known_token *slots;
    size_t cap, used; /* cap: a power of two, kept at most half full */
    text_buf bytes;
} vocabulary;

enum { TOKEN_BYTES_GUESS = 32 }; /* room offered for a new token's bytes before asking its size */

static known_token *vocabulary_slot(known_token *slots, size_t cap, int32_t token) {
    size_t i = ((uint32_t)token * 2654435761u) & (cap - 1);
    while (slots[i].token != -1 && slots[i].token != token) i = (i + 1) & (cap - 1);
    return &slots[i];
}

static int vocabulary_grow(vocabulary *v, size_t cap) {
    known_token *slots = (known_token *)rt_alloc(cap * sizeof(known_token));
    if (!slots) return 0;
    for (size_t i = 0; i < cap; i++) slots[i].token = -1;
    for (size_t i = 0; i < v->cap; i++)
        if (v->slots[i].token != -1) *vocabulary_slot(slots, cap, v->slots[i].token) = v->slots[i];
    v->slots = slots;
    v->cap = cap;
    return 1;
}

static const known_token *vocabulary_full(int32_t *rc) {
    *rc = fail(REALM_E_LIMIT_EXCEEDED, "no memory for the vocabulary", NULL);
    return NULL;
}

static int32_t vocabulary_init(vocabulary *v, const model_ref *m) {
    *v = (vocabulary){m, NULL, 0, 0, {0}};
    int32_t rc = 0;
    if (!vocabulary_grow(v, 256)) vocabulary_full(&rc);
    return rc;
}

/* Token `token` (inside the vocabulary), asked of the host the first time; NULL with *rc set
 * on an error. Its bytes stay where they are until the next token is asked for. */
static const known_token *vocabulary_get(vocabulary *v, int32_t token, int32_t *rc) {
    known_token *k = vocabulary_slot(v->slots, v->cap, token);
    if (k->token == token) return k;
    if (2 * (v->used + 1) > v->cap) {
        if (!vocabulary_grow(v, 2 * v->cap)) return vocabulary_full(rc);
        k = vocabulary_slot(v->slots, v->cap, token);
    }
    if (!text_buf_reserve(&v->bytes, TOKEN_BYTES_GUESS)) return vocabulary_full(rc);
    int32_t model = v->m->id;
    int32_t n = realm_token_bytes(model, token, v->bytes.data + v->bytes.len, v->bytes.cap - v->bytes.len);
    if (n >= 0 && (size_t)n > v->bytes.cap - v->bytes.len) { /* longer than the room offered */
        if (!text_buf_reserve(&v->bytes, (size_t)n)) return vocabulary_full(rc);
        n = realm_token_bytes(model, token, v->bytes.data + v->bytes.len, (size_t)n);
    }
    int32_t end = 0;
    if (n < 0 || (v->m->n_ends < 0 && (end = realm_token_is_end(model, token)) < 0)) {
        *rc = n < 0 ? n : end;
        return NULL;
    }
    for (int32_t i = 0; i < v->m->n_ends; i++) end |= v->m->ends[i] == token;
    *k = (known_token){token, end, v->bytes.len, (size_t)n};
    v->bytes.len += (size_t)n;
    v->used++;
    return k;
}

/* --- generate --------------------------------------------------------------------------------- */

int32_t realm_guest_abi(void) { return REALM_ABI_VERSION; }

/* A generation in progress: the tokens so far are history[0..n_history), the prompt's and
 * then the `generated` ones; text decoded but not yet shown waits in `pending`. */
typedef struct output {
    const request *req;
    const model_ref *m;
    vocabulary voc;
    int32_t session, grammar;
    int32_t *history;
    size_t n_history;
    int32_t generated;
    text_buf pending;
    utf8_dec decoder;
} output;

enum { GO_ON = 0, STOPPED = 1, ENDED = 2 }; /* what taking a token leads to (errors are < 0) */

/* One generated token: its text shown (held back while it may be the start of a stop string),
 * its log-probabilities when asked for, the grammar told. STOPPED: a stop string completed
 * (its text is not shown); ENDED: nothing but an end token may follow under the grammar. */
static int32_t take(output *o, int32_t token) {
    int32_t rc;
    o->history[o->n_history++] = token;
    const known_token *k = vocabulary_get(&o->voc, token, &rc);
    if (!k) return rc;
    const char *piece = o->voc.bytes.data + k->at;
    int32_t n = (int32_t)k->n;
    if (o->generated++ == 0 && o->m->add_space_prefix && n > 0 && piece[0] == ' ') { piece++; n--; }
    utf8_push(&o->decoder, piece, (size_t)n, &o->pending);
    if (o->req->top_logprobs >= 0 && (rc = realm_logprobs(o->session, token, o->req->top_logprobs)) < 0) return rc;
    int stopped = 0;
    size_t shown = split_at_stop(&o->pending, o->req->stops, o->req->n_stops, &stopped);
    if ((rc = realm_emit(token, o->pending.data, shown)) < 0) return rc;
    if (stopped) return STOPPED;
    text_buf_drop(&o->pending, shown);
    if (o->grammar) {
        int32_t status = realm_grammar_consume(o->grammar, &token, 1);
        if (status < 0) return status;
        if (status & REALM_GRAMMAR_DONE) return ENDED;
    }
    return GO_ON;
}

/* Fast-forward: the tokens the grammar forces next (the rest of a key, the punctuation between
 * fields), taken now, up to the budget, so that the next realm_forward runs them all in one
 * step. Not when log-probabilities are asked for: a forced token was never sampled. */
static int32_t fast_forward(output *o, int64_t budget) {
    if (!o->grammar || o->req->top_logprobs >= 0) return GO_ON;
    int32_t *forced = o->history + o->n_history; /* written in place: take() puts each back */
    size_t room = (size_t)o->m->ctx + 1 - o->n_history;
    int32_t n = realm_grammar_forced(o->grammar, forced, room);
    if (n < 0) return n;
    if ((size_t)n > room) return GO_ON; /* not written: did not fit */
    for (int32_t i = 0; i < n && o->generated < budget; i++) {
        int32_t token = forced[i], rc = 0;
        if ((uint32_t)token >= (uint32_t)o->m->vocab) return ENDED;
        const known_token *k = vocabulary_get(&o->voc, token, &rc);
        if (!k) return rc;
        if (k->end) return ENDED;
        if ((rc = take(o, token)) != GO_ON) return rc;
    }
    return GO_ON;
}

/* Step, sample and emit until an end token, a stop string, the end of the grammar or the
 * budget, from the prompt in history[0..n_prompt). Each step hands back its best tokens
 * (realm_forward_top) where sampling looks at no others (top_candidates), else the whole row
 * of the last position's logits into `logits` (masked by the host when a grammar is bound
 * to the session). Ends with realm_finish. */
static int32_t decode(const request *req, const model_ref *m, int32_t session, int32_t grammar, int32_t *history,
                      int32_t n_prompt, int64_t budget, float *logits) {
    output o = {req, m, {0}, session, grammar, history, (size_t)n_prompt, 0, {0}, {{0}, 0}};
    sampler smp;
    int32_t rc;
    if ((rc = vocabulary_init(&o.voc, m)) < 0) return rc;
    if (!sampler_init(&smp, &req->p, m->vocab)) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the sampler", NULL);
    for (int32_t i = 0; i < req->p.n_bias; i++)
        if (req->p.bias_ids[i] >= m->vocab)
            return fail_n(REALM_E_INVALID_ARGUMENT, "logit_bias names token ", req->p.bias_ids[i], ", outside the vocabulary of ", m->vocab);
    int32_t reason = REALM_FINISH_LENGTH, outcome = GO_ON;
    int32_t k = top_candidates(&req->p, m->vocab), top_ids[REALM_MAX_TOP];
    float top_logits[REALM_MAX_TOP];
    size_t fed = 0; /* history[0..fed) has run through the model */
    for (;;) {
        if ((outcome = fast_forward(&o, budget)) != GO_ON) break;
        if (o.generated >= budget) break; /* nothing more to sample: no step to run */
        int32_t token;
        if (k > 0) {
            int32_t n = realm_forward_top(session, history + fed, (int32_t)(o.n_history - fed), k, top_ids, top_logits);
            if (n < 0) return n;
            token = sample_top(&smp, top_ids, top_logits, n);
        } else {
            if ((rc = realm_forward(session, history + fed, o.n_history - fed, logits, (size_t)m->vocab)) < 0) return rc;
            token = sample(&smp, logits, history, o.n_history);
        }
        fed = o.n_history;
        if ((uint32_t)token >= (uint32_t)m->vocab)
            return fail_n(REALM_E_INVALID_ARGUMENT, "sampled token ", token, " is outside the vocabulary of ", m->vocab);
        const known_token *k = vocabulary_get(&o.voc, token, &rc);
        if (!k) return rc;
        if (k->end) {
            reason = REALM_FINISH_STOP;
            break;
        }
        if ((outcome = take(&o, token)) != GO_ON) break;
    }
    if (outcome < 0) return outcome;
    if (outcome == STOPPED) {
        realm_session_close(session);
        return realm_finish(REALM_FINISH_STOP, n_prompt, o.generated);
    }
    if (outcome == ENDED) reason = REALM_FINISH_STOP;
    utf8_flush(&o.decoder, &o.pending);
    if (o.pending.len && (rc = realm_emit(-1, o.pending.data, o.pending.len)) < 0) return rc;
    realm_session_close(session);
    return realm_finish(reason, n_prompt, o.generated);
}

static int32_t run(void) {
    int32_t rc;
    int32_t size = realm_request_read(NULL, 0);
    if (size < 0) return size;
    char *json = (char *)rt_alloc((size_t)size + 1);
    if (!json) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the request", NULL);
    if ((rc = realm_request_read(json, (size_t)size)) < 0) return rc;
    request req;
    if ((rc = parse_request(json, (size_t)size, &req))) return rc;

    model_ref m;
    if ((rc = model_open(&req, &m)) < 0) return rc;
    int32_t *history;
    int32_t n_prompt = prompt_tokens(json, (size_t)size, &req, &m, &history);
    if (n_prompt < 0) return n_prompt;
    int64_t budget = req.p.max_tokens < (int64_t)(m.ctx - n_prompt) ? req.p.max_tokens : (int64_t)(m.ctx - n_prompt);

    float *logits = NULL; /* a whole row, for a sampler that needs one */
    if (!top_candidates(&req.p, m.vocab) && !(logits = (float *)rt_alloc((size_t)m.vocab * sizeof(float))))
        return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the logits", NULL);
    /* a context of exactly what this request can use: the host sizes the session's KV cache
     * by it, so many short requests at once hold little memory */
    int32_t session = realm_session_open(m.id, (int32_t)(n_prompt + budget));
    if (session < 0) return session;
    int32_t grammar = 0;
    if (req.constraint) { /* the host masks every step's logits by the grammar's state */
        if ((grammar = realm_grammar_compile(m.id, req.constraint, req.constraint_len)) < 0) return grammar;
        if ((rc = realm_session_set_grammar(session, grammar)) < 0) return rc;
    }
    return decode(&req, &m, session, grammar, history, n_prompt, budget, logits);
}

int32_t generate(void) {
    rt_reset(); /* every request starts with an empty heap */
    int32_t rc = run();
    return rc < 0 ? rc : 0;
}
