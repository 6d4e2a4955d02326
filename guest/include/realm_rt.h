/*
 * realm_rt.h: a small freestanding runtime for Realm guests written in C (no libc).
 *
 * Shared by the guests in guest/ (default.c, dispatch.c): extend it here rather than
 * writing a second one. Everything is `static` (one translation unit per guest); memcpy,
 * memset and memmove come from zig's compiler runtime, which the guest build links.
 *
 *   memory:  rt_alloc (bump allocator over memory.grow, 16-byte aligned), rt_reset,
 *            rt_mark / rt_release for scratch.
 *   math:    rt_exp, rt_log, rt_pow, rt_sin, rt_cos, rt_sqrt (double, accurate to a few
 *            ulps, which is what the host's float64 RoPE tables and float32 results need);
 *            rt_expf, rt_tanhf, rt_silu, rt_gelu_tanh (float in, float out).
 *   text:    rt_strlen, rt_memeq, rt_fmt_int (decimal), rt_utf8_take (the printable part of
 *            a byte buffer, invalid bytes replaced as Python does).
 *   JSON:    rt_json_get (a top-level key's value, as a span), rt_json_string (decode a
 *            string value into UTF-8), rt_json_number, rt_json_is_null.
 *
 * Builds for wasm32 and wasm64 alike (pointers and size_t follow the target).
 */
#ifndef REALM_RT_H
#define REALM_RT_H

#include <stddef.h>
#include <stdint.h>

/* --- memory -------------------------------------------------------------------------------- */

/* From zig's compiler runtime, which `realm guest build` links (realm/sandbox/toolchain.py). */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);

extern unsigned char __heap_base; /* provided by wasm-ld: the first byte after data + stack */

#define RT_PAGE ((size_t)65536)

static size_t rt_heap_top; /* next free address; 0 until first use */

/* Forgets every allocation (the memory stays grown, for the next request to reuse). */
static void rt_reset(void) { rt_heap_top = (size_t)&__heap_base; }

/* n bytes, 16-byte aligned, not zeroed; NULL when memory cannot grow any more. */
static void *rt_alloc(size_t n) {
    if (!rt_heap_top) rt_reset();
    size_t start = (rt_heap_top + 15) & ~(size_t)15;
    if (n > SIZE_MAX - start - RT_PAGE) return NULL;
    size_t end = start + n;
    size_t have = __builtin_wasm_memory_size(0) * RT_PAGE;
    if (end > have) {
        size_t pages = (end - have + RT_PAGE - 1) / RT_PAGE;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return NULL;
    }
    rt_heap_top = end;
    return (void *)start;
}

static void *rt_zalloc(size_t n) {
    void *p = rt_alloc(n);
    if (p) memset(p, 0, n);
    return p;
}

/* Scratch: everything allocated after rt_mark() is freed by rt_release(mark). */
static size_t rt_mark(void) {
    if (!rt_heap_top) rt_reset();
    return rt_heap_top;
}
static void rt_release(size_t mark) { rt_heap_top = mark; }

/* --- math ---------------------------------------------------------------------------------- */

static inline double rt_sqrt(double x) { return __builtin_sqrt(x); }
static inline double rt_round(double x) { return __builtin_nearbyint(x); }

static inline double rt_ldexp_int(double x, int k) { /* x * 2^k for k in [-1022, 1023] */
    union { double d; uint64_t u; } s;
    s.u = (uint64_t)(k + 1023) << 52;
    return x * s.d;
}

/* e^x, relative error ~1e-16. The sampler's exp (docs/ABI.md, "Sampling"): the host mirrors it
 * bit for bit (realm/engine/sampling.py, exp64), so a change here changes seeded output. */
static double rt_exp(double x) {
    if (x != x) return x;
    if (x > 709.0) return __builtin_inf();
    if (x < -745.0) return 0.0;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    double k = rt_round(x * 1.44269504088896338700);
    double r = (x - k * ln2_hi) - k * ln2_lo; /* |r| <= 0.35 */
    double term = 1.0, sum = 1.0;
    for (int i = 1; i <= 14; i++) {
        term *= r / i;
        sum += term;
    }
    int ki = (int)k;
    if (ki < -1000) return rt_ldexp_int(rt_ldexp_int(sum, ki + 600), -600);
    if (ki > 1000) return rt_ldexp_int(rt_ldexp_int(sum, ki - 600), 600);
    return rt_ldexp_int(sum, ki);
}

/* Natural log for x > 0 (NaN for x < 0, -inf for 0). */
static double rt_log(double x) {
    if (x != x || x < 0) return __builtin_nan("");
    if (x == 0) return -__builtin_inf();
    if (x == __builtin_inf()) return x;
    union { double d; uint64_t u; } v = {x};
    int e = (int)((v.u >> 52) & 0x7ff);
    if (e == 0) { /* subnormal: scale up */
        v.d = x * 18014398509481984.0; /* 2^54 */
        e = (int)((v.u >> 52) & 0x7ff) - 54;
    }
    e -= 1023;
    v.u = (v.u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL; /* m in [1, 2) */
    double m = v.d;
    if (m > 1.41421356237309504880) {
        m *= 0.5;
        e += 1;
    }
    double s = (m - 1.0) / (m + 1.0), s2 = s * s; /* |s| <= 0.172 */
    double term = s, sum = 0.0;
    for (int i = 1; i <= 27; i += 2) {
        sum += term / i;
        term *= s2;
    }
    return 2.0 * sum + e * 6.93147180559945309417e-01;
}

static double rt_pow(double base, double y) { /* base > 0 */
    if (y == 0) return 1.0;
    return rt_exp(y * rt_log(base));
}

/* sin and cos on |r| <= pi/4 (Taylor series to r^19). */
static double rt_sin_kernel(double r) {
    double r2 = r * r, term = r, sum = r;
    for (int i = 1; i <= 9; i++) {
        term *= -r2 / ((2 * i) * (2 * i + 1));
        sum += term;
    }
    return sum;
}
static double rt_cos_kernel(double r) {
    double r2 = r * r, term = 1.0, sum = 1.0;
    for (int i = 1; i <= 9; i++) {
        term *= -r2 / ((2 * i - 1) * (2 * i));
        sum += term;
    }
    return sum;
}

/* x = k * pi/2 + r (Cody-Waite, three parts of pi/2): accurate for |x| up to ~1e9. */
static double rt_trig_reduce(double x, int *quadrant) {
    const double p1 = 1.57079632673412561417e+00, p2 = 6.07710050650619224932e-11,
                 p3 = 2.02226624879595063154e-21;
    double k = rt_round(x * 6.36619772367581382433e-01);
    *quadrant = (int)((int64_t)k & 3);
    return ((x - k * p1) - k * p2) - k * p3;
}

static double rt_sin(double x) {
    int q;
    double r = rt_trig_reduce(x, &q);
    switch (q) {
        case 0: return rt_sin_kernel(r);
        case 1: return rt_cos_kernel(r);
        case 2: return -rt_sin_kernel(r);
        default: return -rt_cos_kernel(r);
    }
}

static double rt_cos(double x) {
    int q;
    double r = rt_trig_reduce(x, &q);
    switch (q) {
        case 0: return rt_cos_kernel(r);
        case 1: return -rt_sin_kernel(r);
        case 2: return -rt_cos_kernel(r);
        default: return rt_sin_kernel(r);
    }
}

static inline float rt_expf(float x) { return (float)rt_exp((double)x); }

static float rt_tanhf(float x) {
    double a = x < 0 ? -(double)x : (double)x;
    double t;
    if (a < 1e-5) {
        t = a;
    } else if (a > 20.0) {
        t = 1.0;
    } else {
        t = 1.0 - 2.0 / (rt_exp(2.0 * a) + 1.0);
    }
    return (float)(x < 0 ? -t : t);
}

/* x * sigmoid(x), as torch.nn.functional.silu. */
static inline float rt_silu(float x) { return (float)((double)x / (1.0 + rt_exp(-(double)x))); }

/* torch.nn.functional.gelu(x, approximate="tanh"). */
static inline float rt_gelu_tanh(float x) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * x * (1.0f + rt_tanhf(k * (x + 0.044715f * x * x * x)));
}

/* --- text ---------------------------------------------------------------------------------- */

static size_t rt_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

static int rt_memeq(const void *a, const void *b, size_t n) {
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return 0;
    return 1;
}

/* Writes v in decimal at out (no terminator); returns the number of characters (<= 20). */
static size_t rt_fmt_int(char *out, int64_t v) {
    char tmp[24];
    size_t n = 0, len = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = tmp[--n];
    return len;
}

/* The next UTF-8 sequence at s[0..n): > 0 the length of a whole valid character; 0 a valid
 * but unfinished start (more bytes may complete it); < 0 minus the length of an invalid
 * "maximal subpart" (the bytes Python's decoder replaces with one U+FFFD). */
static int rt_utf8_next(const unsigned char *s, size_t n) {
    unsigned char b = s[0];
    int len;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) len = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        len = 3;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        len = 4;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else
        return -1;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        unsigned char c = s[i];
        if (i == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) return -i;
    }
    return len;
}

/* Copies the printable part of in[0..n) to out (which must hold 3 * n bytes), invalid bytes
 * becoming U+FFFD as bytes.decode("utf-8", "replace") does; an unfinished character at the
 * end is left for later unless `final` (then it is one U+FFFD). Returns the bytes written;
 * *used is how many input bytes were consumed. */
static size_t rt_utf8_take(const unsigned char *in, size_t n, int final, char *out, size_t *used) {
    size_t i = 0, o = 0;
    while (i < n) {
        int len = rt_utf8_next(in + i, n - i);
        if (len == 0 && !final) break;
        if (len <= 0) {
            out[o++] = (char)0xEF, out[o++] = (char)0xBF, out[o++] = (char)0xBD;
            i += len == 0 ? n - i : (size_t)-len;
            continue;
        }
        memcpy(out + o, in + i, (size_t)len);
        o += (size_t)len;
        i += (size_t)len;
    }
    *used = i;
    return o;
}

/* --- JSON (enough to read a request object) -------------------------------------------------- */

typedef struct {
    const char *p; /* the value's first character; NULL if absent */
    size_t len;    /* the value's length in bytes, as written */
} rt_span;

static size_t rt_json_ws(const char *s, size_t n, size_t i) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

/* Index just after the JSON value that starts at s[i]; 0 when malformed. */
static size_t rt_json_skip(const char *s, size_t n, size_t i) {
    int depth = 0;
    if (i >= n) return 0;
    do {
        if (i >= n) return 0;
        char c = s[i];
        if (c == '"') {
            for (i++; i < n && s[i] != '"'; i++)
                if (s[i] == '\\') i++;
            if (i >= n) return 0;
            i++;
        } else if (c == '{' || c == '[') {
            depth++;
            i++;
        } else if (c == '}' || c == ']') {
            if (depth == 0) return 0;
            depth--;
            i++;
        } else if (c == ',' || c == ':' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (depth == 0) return 0;
            i++;
        } else { /* number, true, false, null */
            size_t start = i;
            while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' &&
                   s[i] != '\t' && s[i] != '\n' && s[i] != '\r' && s[i] != ':' && s[i] != '"')
                i++;
            if (i == start) return 0;
        }
    } while (depth > 0);
    return i;
}

static int rt_json_key_eq(const char *s, size_t len, const char *key) {
    /* s..len is the raw key between quotes; keys we look for have no escapes */
    size_t k = rt_strlen(key);
    return k == len && rt_memeq(s, key, len);
}

/* The value of `key` in the JSON object `s` (whitespace around it allowed). Returns
 * 1 and the span if found, 0 if absent, -1 if `s` is not a well-formed object. */
static int rt_json_get(const char *s, size_t n, const char *key, rt_span *out) {
    out->p = NULL;
    out->len = 0;
    size_t i = rt_json_ws(s, n, 0);
    if (i >= n || s[i] != '{') return -1;
    i = rt_json_ws(s, n, i + 1);
    if (i < n && s[i] == '}') return 0;
    while (i < n) {
        if (s[i] != '"') return -1;
        size_t kstart = i + 1, kend = rt_json_skip(s, n, i);
        if (!kend) return -1;
        i = rt_json_ws(s, n, kend);
        if (i >= n || s[i] != ':') return -1;
        i = rt_json_ws(s, n, i + 1);
        size_t vend = rt_json_skip(s, n, i);
        if (!vend) return -1;
        if (rt_json_key_eq(s + kstart, kend - 1 - kstart, key) && !out->p) {
            out->p = s + i;
            out->len = vend - i;
        }
        i = rt_json_ws(s, n, vend);
        if (i < n && s[i] == '}') return out->p ? 1 : 0;
        if (i >= n || s[i] != ',') return -1;
        i = rt_json_ws(s, n, i + 1);
    }
    return -1;
}

static int rt_hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static size_t rt_utf8_put(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decodes a JSON string value into out (which must hold v.len bytes: decoding never grows
 * it). Returns the decoded length, or -1 if v is not a well-formed string. A lone
 * surrogate becomes U+FFFD, as Python's json + UTF-8 "replace" would show it. */
static int64_t rt_json_string(rt_span v, char *out) {
    if (!v.p || v.len < 2 || v.p[0] != '"' || v.p[v.len - 1] != '"') return -1;
    size_t o = 0;
    for (size_t i = 1; i + 1 < v.len; i++) {
        char c = v.p[i];
        if (c != '\\') {
            out[o++] = c;
            continue;
        }
        if (++i + 1 >= v.len) return -1;
        switch (v.p[i]) {
            case '"': out[o++] = '"'; break;
            case '\\': out[o++] = '\\'; break;
            case '/': out[o++] = '/'; break;
            case 'b': out[o++] = '\b'; break;
            case 'f': out[o++] = '\f'; break;
            case 'n': out[o++] = '\n'; break;
            case 'r': out[o++] = '\r'; break;
            case 't': out[o++] = '\t'; break;
            case 'u': {
                uint32_t cp = 0;
                if (i + 4 >= v.len) return -1;
                for (int k = 1; k <= 4; k++) {
                    int h = rt_hex(v.p[i + k]);
                    if (h < 0) return -1;
                    cp = cp * 16 + (uint32_t)h;
                }
                i += 4;
                if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 < v.len && v.p[i + 1] == '\\' &&
                    v.p[i + 2] == 'u') {
                    uint32_t lo = 0;
                    int ok = 1;
                    for (int k = 3; k <= 6; k++) {
                        int h = rt_hex(v.p[i + k]);
                        if (h < 0) ok = 0;
                        lo = lo * 16 + (uint32_t)(h < 0 ? 0 : h);
                    }
                    if (ok && lo >= 0xDC00 && lo <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                }
                if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
                o += rt_utf8_put(out + o, cp);
                break;
            }
            default: return -1;
        }
    }
    return (int64_t)o;
}

static int rt_json_is_null(rt_span v) { return v.p && v.len == 4 && rt_memeq(v.p, "null", 4); }

/* A JSON number as a double (to within an ulp or two). Returns 0 on success, -1 if v is not
 * a number. */
static int rt_json_number(rt_span v, double *out) {
    size_t i = 0, n = v.len;
    const char *s = v.p;
    if (!s || !n) return -1;
    int neg = 0, digits = 0, exp10 = 0;
    uint64_t mant = 0;
    if (s[i] == '-') neg = 1, i++;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++) {
        if (mant < 100000000000000000ULL) mant = mant * 10 + (uint64_t)(s[i] - '0');
        else exp10++;
    }
    if (i < n && s[i] == '.') {
        for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++) {
            if (mant < 100000000000000000ULL) {
                mant = mant * 10 + (uint64_t)(s[i] - '0');
                exp10--;
            }
        }
    }
    if (!digits) return -1;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        int eneg = 0, e = 0, ed = 0;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) eneg = s[i] == '-', i++;
        for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, ed++)
            if (e < 10000) e = e * 10 + (s[i] - '0');
        if (!ed) return -1;
        exp10 += eneg ? -e : e;
    }
    if (i != n) return -1;
    double x = (double)mant;
    /* scale by 10^exp10 with exact powers where possible (10^22 is the largest exact one) */
    static const double p10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    while (exp10 > 22) x *= 1e22, exp10 -= 22;
    while (exp10 < -22) x /= 1e22, exp10 += 22;
    x = exp10 >= 0 ? x * p10[exp10] : x / p10[-exp10];
    *out = neg ? -x : x;
    return 0;
}

#endif
