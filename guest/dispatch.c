/*
 * dispatch.c: a guest that runs greedy generation through the lower levels of the ABI.
 *
 * The request's "level" picks how each forward step is computed:
 *   "layer"  the host runs each layer (realm_embed, realm_forward_layer, realm_logits);
 *   "op"     this guest runs the transformer and its own KV cache; every matrix product
 *            goes to the host by realm_get_backend_type(): weight x activation through
 *            realm_matmul_weight (the weights never enter guest memory), activation x
 *            activation (q.k^T, attention . v) through realm_matmul_gpu (1) or
 *            realm_matmul_cpu (0), or a naive matmul here when the host has none (2);
 *   "naive"  this guest fetches every weight once (realm_tensor_read) and computes
 *            everything in WASM;
 *   "auto"   "op" when the host has a backend (0 or 1), else "naive" (the seed's dispatch).
 * "op" and "naive" run llama and gemma3, shaped by the `config` of the model info JSON.
 * "layer" gives exactly the host's own greedy tokens. "naive" computes in float32 from the
 * dequantized weights: the tokens of the host's float32 reference backend (on float32
 * weights, the host's own). "op" uses the host's kernels for the weight products, so on
 * quantized weights it may break a near tie differently from either.
 *
 * Request fields: model (name), model_sha256 (hex, optional: checked against the stored
 * model), prompt (or messages, rendered by the model's chat template), max_tokens, level.
 */
#include "realm.h"
#include "realm_rt.h"

#define MAX_LAYERS 512
#define PREFILL_CHUNK 512 /* prompt tokens per forward step, as the host's Session.feed */
#define DEFAULT_MAX_TOKENS 128
#define READ_CHUNK (REALM_MAX_TRANSFER / (int)sizeof(float)) /* floats per realm_tensor_read */

enum level { LEVEL_LAYER, LEVEL_OP, LEVEL_NAIVE };

/* --- logging --------------------------------------------------------------------------------- */

static void say(int32_t lvl, const char *a, const char *b, int64_t code) {
    char msg[512];
    size_t n = 0;
    for (const char *s = "dispatch: "; *s; s++) msg[n++] = *s;
    for (const char *s = a; s && *s && n < 400; s++) msg[n++] = *s;
    for (const char *s = b; s && *s && n < 490; s++) msg[n++] = *s;
    if (code != INT64_MIN) {
        msg[n++] = ' ';
        n += rt_fmt_int(msg + n, code);
    }
    realm_log(lvl, msg, n);
}

/* "level op: weight products 240 host, 0 guest; activation products 128 host, 0 guest" */
static void log_counts(const char *level, const int64_t counts[4]) {
    static const char *const parts[] = {": weight products ", " host, ", " guest; activation products ",
                                        " host, "};
    char msg[256];
    size_t n = 0;
    for (const char *s = "dispatch: level "; *s; s++) msg[n++] = *s;
    for (const char *s = level; *s; s++) msg[n++] = *s;
    for (int i = 0; i < 4; i++) {
        for (const char *s = parts[i]; *s; s++) msg[n++] = *s;
        n += rt_fmt_int(msg + n, counts[i]);
    }
    for (const char *s = " guest"; *s; s++) msg[n++] = *s;
    realm_log(REALM_LOG_INFO, msg, n);
}

/* Logs a failed host call and passes its code on. */
static int32_t fail(const char *what, int32_t code) {
    say(REALM_LOG_ERROR, what, " failed with code", code);
    return code;
}

/* --- the model's shape --------------------------------------------------------------------- */

typedef struct {
    int arch; /* 1 llama, 2 gemma3 */
    int n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    float norm_eps, embed_scale, attn_scale;
    double rope_base, rope_scale, rope_base_local;
    int rope_neox, gelu, qk_norm, sandwich, sliding_window, sliding_pattern;
    int tied; /* no output.weight: the output projection is token_embd */
} Config;

typedef struct {
    float *attn_norm, *ffn_norm;                       /* (dim,) */
    float *q_norm, *k_norm;                            /* (head_dim,) gemma3 */
    float *post_attn_norm, *post_ffn_norm;             /* (dim,) gemma3 */
    float *wq, *wk, *wv, *wo, *wg, *wu, *wd;           /* naive only: (out, in) row-major */
} Layer;

typedef struct {
    int32_t model;
    int level, backend;
    Config c;
    Layer layers[MAX_LAYERS];
    float *out_norm;          /* (dim,) */
    float *tok_embd, *output; /* naive only: (vocab, dim); output == tok_embd when tied */
    int unfused;              /* the host offers no fused q/k/v and gate/up weights */
    int64_t host_weight, guest_weight, host_matmul, guest_matmul; /* what ran where (logged) */
    int ctx;                  /* positions the KV cache holds */
    float *kc, *vc;           /* (n_layers, n_kv_heads, ctx, head_dim) */
    double *inv_freq, *inv_freq_local; /* (head_dim / 2) */
} Run;

static size_t tensor_name(char *out, int layer, const char *part) {
    size_t n = 0;
    if (layer >= 0) {
        for (const char *s = "blk."; *s; s++) out[n++] = *s;
        n += rt_fmt_int(out + n, layer);
        out[n++] = '.';
    }
    for (const char *s = part; *s; s++) out[n++] = *s;
    for (const char *s = ".weight"; *s; s++) out[n++] = *s;
    out[n] = 0;
    return n;
}

/* The tensor's dims (rows first); returns the number of dims or a REALM_E_* code. */
static int32_t shape(Run *r, int layer, const char *part, int64_t dims[4]) {
    char name[96];
    size_t len = tensor_name(name, layer, part);
    return realm_tensor_shape(r->model, name, len, dims);
}

/* The whole tensor, dequantized, into fresh guest memory (in pieces the ABI allows). */
static int32_t fetch(Run *r, int layer, const char *part, int64_t count, float **out) {
    char name[96];
    size_t len = tensor_name(name, layer, part);
    float *buf = (float *)rt_alloc((size_t)count * sizeof(float));
    if (!buf) {
        say(REALM_LOG_ERROR, "out of guest memory fetching ", name, count);
        return REALM_E_LIMIT_EXCEEDED;
    }
    for (int64_t off = 0; off < count;) {
        int32_t want = count - off < READ_CHUNK ? (int32_t)(count - off) : READ_CHUNK;
        int32_t got = realm_tensor_read(r->model, name, len, off, want, buf + off);
        if (got < 0) return fail(name, got);
        if (got == 0) {
            say(REALM_LOG_ERROR, "realm_tensor_read returned nothing for ", name, off);
            return REALM_E_INTERNAL;
        }
        off += got;
    }
    *out = buf;
    return 0;
}

/* A vector or matrix whose shape must be exactly rows x cols (cols 0 for a vector). */
static int32_t fetch_checked(Run *r, int layer, const char *part, int64_t rows, int64_t cols,
                             float **out) {
    int64_t dims[4] = {0, 0, 0, 0};
    int32_t nd = shape(r, layer, part, dims);
    if (nd < 0) return fail(part, nd);
    int ok = cols ? (nd == 2 && dims[0] == rows && dims[1] == cols) : (nd == 1 && dims[0] == rows);
    if (!ok) {
        say(REALM_LOG_ERROR, "unexpected shape of tensor ", part, layer);
        return REALM_E_MODEL_FORMAT;
    }
    return fetch(r, layer, part, cols ? rows * cols : rows, out);
}

/* A field of the model info JSON: in its "config" object (the architecture's
 * hyper-parameters, docs/ABI.md) or else at its top level. 1 if found. */
static int info_field(const char *json, size_t n, const char *key, rt_span *v) {
    rt_span cfg;
    if (rt_json_get(json, n, "config", &cfg) == 1 && rt_json_get(cfg.p, cfg.len, key, v) == 1 &&
        !rt_json_is_null(*v))
        return 1;
    return rt_json_get(json, n, key, v) == 1 && !rt_json_is_null(*v);
}

static int info_number(const char *json, size_t n, const char *key, double *out) {
    rt_span v;
    return info_field(json, n, key, &v) && rt_json_number(v, out) == 0;
}

static int info_flag(const char *json, size_t n, const char *key, int dflt) {
    rt_span v;
    if (!info_field(json, n, key, &v)) return dflt;
    if (v.len == 4 && rt_memeq(v.p, "true", 4)) return 1;
    if (v.len == 5 && rt_memeq(v.p, "false", 5)) return 0;
    return dflt;
}

/* Reads the model's shape for the op and naive levels: the host's config (model info JSON),
 * where a field is missing the architecture's value from realm/models/config.py, and the
 * tensor shapes. */
static int32_t load_config(Run *r, const realm_model_info *info, const char *json, size_t n) {
    Config *c = &r->c;
    c->arch = (int)info->architecture;
    if (c->arch != 1 && c->arch != 2) {
        say(REALM_LOG_ERROR, "unsupported architecture (1 llama, 2 gemma3):", "", c->arch);
        return REALM_E_UNSUPPORTED;
    }
    if (c->n_layers <= 0 || c->n_layers > MAX_LAYERS) return REALM_E_UNSUPPORTED;
    int gemma = c->arch == 2;

    double heads = 0, kv_heads = 0, eps = 0, base = 0, v;
    if (!(info_number(json, n, "n_heads", &heads) || info_number(json, n, "heads", &heads)) ||
        !(info_number(json, n, "n_kv_heads", &kv_heads) || info_number(json, n, "kv_heads", &kv_heads)) ||
        !info_number(json, n, "norm_eps", &eps) || !info_number(json, n, "rope_base", &base)) {
        say(REALM_LOG_ERROR, "the host's model info lacks the head counts, norm_eps or rope_base",
            "", INT64_MIN);
        return REALM_E_UNSUPPORTED;
    }
    c->n_heads = (int)heads;
    c->n_kv_heads = (int)kv_heads;
    if (c->n_heads <= 0 || c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads) return REALM_E_MODEL_FORMAT;
    c->norm_eps = (float)eps;
    c->rope_base = base;
    c->rope_scale = info_number(json, n, "rope_scale", &v) && v > 0 ? v : 1.0;
    c->rope_neox = info_flag(json, n, "rope_neox", gemma);
    rt_span act;
    c->gelu = info_field(json, n, "activation", &act) ? act.len == 11 && rt_memeq(act.p, "\"gelu_tanh\"", 11)
                                                       : gemma;
    c->qk_norm = info_flag(json, n, "qk_norm", gemma);
    c->sandwich = info_flag(json, n, "sandwich_norms", gemma);
    c->sliding_window = info_number(json, n, "sliding_window", &v) ? (int)v : 0;
    c->sliding_pattern = info_number(json, n, "sliding_pattern", &v) ? (int)v : gemma ? 6 : 0;
    c->rope_base_local = info_number(json, n, "rope_base_local", &v) && v > 0 ? v : 10000.0;

    int64_t dq[4], dk[4], dg[4], dout[4];
    int32_t rc;
    if ((rc = shape(r, 0, "attn_q", dq)) < 0) return fail("realm_tensor_shape attn_q", rc);
    if ((rc = shape(r, 0, "attn_k", dk)) < 0) return fail("realm_tensor_shape attn_k", rc);
    if ((rc = shape(r, 0, "ffn_gate", dg)) < 0) return fail("realm_tensor_shape ffn_gate", rc);
    c->head_dim = info_number(json, n, "head_dim", &v) ? (int)v : (int)(dq[0] / c->n_heads);
    c->ffn_dim = (int)dg[0];
    if (dq[0] != (int64_t)c->n_heads * c->head_dim || dk[0] != (int64_t)c->n_kv_heads * c->head_dim ||
        dq[1] != c->dim || c->head_dim <= 0 || c->head_dim % 2) {
        say(REALM_LOG_ERROR, "attention shapes do not match the model info", "", INT64_MIN);
        return REALM_E_MODEL_FORMAT;
    }
    rc = shape(r, -1, "output", dout);
    if (rc == REALM_E_NOT_FOUND) c->tied = 1;
    else if (rc < 0) return fail("realm_tensor_shape output", rc);
    c->embed_scale = info_number(json, n, "embed_scale", &v) ? (float)v
                     : gemma                                ? (float)rt_sqrt((double)c->dim)
                                                            : 1.0f;
    c->attn_scale = info_number(json, n, "attn_scale", &v) && v > 0
                        ? (float)v
                        : (float)(1.0 / rt_sqrt((double)c->head_dim));
    return 0;
}

/* Norm vectors always (both levels compute the norms); matrices for the naive level. */
static int32_t load_weights(Run *r) {
    Config *c = &r->c;
    int64_t dim = c->dim, nq = (int64_t)c->n_heads * c->head_dim,
            nkv = (int64_t)c->n_kv_heads * c->head_dim, ffn = c->ffn_dim;
    int32_t rc;
#define GET(layer, part, rows, cols, dst) \
    if ((rc = fetch_checked(r, layer, part, rows, cols, dst)) < 0) return rc
    for (int i = 0; i < c->n_layers; i++) {
        Layer *L = &r->layers[i];
        GET(i, "attn_norm", dim, 0, &L->attn_norm);
        GET(i, "ffn_norm", dim, 0, &L->ffn_norm);
        if (c->qk_norm) {
            GET(i, "attn_q_norm", c->head_dim, 0, &L->q_norm);
            GET(i, "attn_k_norm", c->head_dim, 0, &L->k_norm);
        }
        if (c->sandwich) {
            GET(i, "post_attention_norm", dim, 0, &L->post_attn_norm);
            GET(i, "post_ffw_norm", dim, 0, &L->post_ffn_norm);
        }
        if (r->level == LEVEL_NAIVE) {
            GET(i, "attn_q", nq, dim, &L->wq);
            GET(i, "attn_k", nkv, dim, &L->wk);
            GET(i, "attn_v", nkv, dim, &L->wv);
            GET(i, "attn_output", dim, nq, &L->wo);
            GET(i, "ffn_gate", ffn, dim, &L->wg);
            GET(i, "ffn_up", ffn, dim, &L->wu);
            GET(i, "ffn_down", dim, ffn, &L->wd);
        }
    }
    GET(-1, "output_norm", dim, 0, &r->out_norm);
    if (r->level == LEVEL_NAIVE) {
        GET(-1, "token_embd", c->vocab, dim, &r->tok_embd);
        if (c->tied) r->output = r->tok_embd;
        else GET(-1, "output", c->vocab, dim, &r->output);
    }
#undef GET
    return 0;
}

static double *rope_freqs(int head_dim, double base) {
    /* inv_freq[i] = 1 / base^(2i / head_dim), in float64 like the host */
    double *f = (double *)rt_alloc(sizeof(double) * (size_t)(head_dim / 2));
    if (!f) return NULL;
    for (int i = 0; i < head_dim / 2; i++) f[i] = 1.0 / rt_pow(base, (double)(2 * i) / head_dim);
    return f;
}

/* --- compute ------------------------------------------------------------------------------- */

typedef float f32x4 __attribute__((vector_size(16), aligned(4), __may_alias__));

static float dot(const float *a, const float *b, int n) {
    f32x4 s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 += *(const f32x4 *)(a + i) * *(const f32x4 *)(b + i);
        s1 += *(const f32x4 *)(a + i + 4) * *(const f32x4 *)(b + i + 4);
    }
    s0 += s1;
    float s = (s0[0] + s0[1]) + (s0[2] + s0[3]);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* c (m x n) = a (m x k) @ b (k x n), in WASM. */
static void naive_matmul(const float *a, const float *b, int m, int k, int n, float *c) {
    for (int i = 0; i < m; i++) {
        float *row = c + (size_t)i * n;
        for (int j = 0; j < n; j++) row[j] = 0.0f;
        for (int p = 0; p < k; p++) {
            float s = a[(size_t)i * k + p];
            const float *brow = b + (size_t)p * n;
            for (int j = 0; j < n; j++) row[j] += s * brow[j];
        }
    }
}

/* Activation x activation product, dispatched by the host's backend type (the seed). */
static int32_t matmul(Run *r, const float *a, const float *b, int m, int k, int n, float *c) {
    int32_t rc = 0;
    if (r->level == LEVEL_OP && r->backend == REALM_BACKEND_GPU) {
        rc = realm_matmul_gpu(a, b, m, k, n, c);
        r->host_matmul++;
    } else if (r->level == LEVEL_OP && r->backend == REALM_BACKEND_CPU) {
        rc = realm_matmul_cpu(a, b, m, k, n, c);
        r->host_matmul++;
    } else {
        naive_matmul(a, b, m, k, n, c);
        r->guest_matmul++;
    }
    return rc < 0 ? fail("matmul", rc) : 0;
}

/* y (m x out) = x (m x in) @ W^T for the weight `part` of `layer`: the host's copy at the
 * op level, the fetched one (w) at the naive level. */
static int32_t linear(Run *r, int layer, const char *part, const float *w, const float *x, int m,
                      int in, int out, float *y) {
    if (r->level == LEVEL_OP) {
        char name[96];
        size_t len = tensor_name(name, layer, part);
        int32_t rc = realm_matmul_weight(r->model, name, len, x, m, y, (size_t)m * out);
        r->host_weight++;
        if (rc < 0) return fail(name, rc);
        if (rc != out) {
            say(REALM_LOG_ERROR, "realm_matmul_weight: unexpected width of ", name, rc);
            return REALM_E_MODEL_FORMAT;
        }
        return 0;
    }
    r->guest_weight++;
    for (int o = 0; o < out; o++) {
        const float *wr = w + (size_t)o * in;
        for (int i = 0; i < m; i++) y[(size_t)i * out + o] = dot(x + (size_t)i * in, wr, in);
    }
    return 0;
}

/* Several products of the same input x (n x in) at once: q, k, v or gate, up. At the op
 * level one host call with the fused weight the host keeps (blk.N.attn_qkv,
 * blk.N.ffn_gate_up), its columns then split; otherwise one product per GGUF tensor. */
static int32_t linear_fused(Run *r, int layer, const char *fused, int count, const char *const *parts,
                            float *const *ws, float *const *outs, const int *widths, const float *x,
                            int n, int in) {
    if (r->level == LEVEL_OP && !r->unfused) {
        int total = 0;
        for (int i = 0; i < count; i++) total += widths[i];
        size_t mark = rt_mark();
        float *y = (float *)rt_alloc(sizeof(float) * (size_t)n * total); /* (n, total) */
        if (!y) return REALM_E_LIMIT_EXCEEDED;
        char name[96];
        size_t len = tensor_name(name, layer, fused);
        int32_t rc = realm_matmul_weight(r->model, name, len, x, n, y, (size_t)n * total);
        if (rc >= 0) r->host_weight++;
        if (rc == REALM_E_NOT_FOUND || rc == REALM_E_UNSUPPORTED) {
            r->unfused = 1; /* a host without them: the GGUF tensors one by one */
        } else if (rc < 0) {
            return fail(name, rc);
        } else if (rc != total) {
            say(REALM_LOG_ERROR, "realm_matmul_weight: unexpected width of ", name, rc);
            return REALM_E_MODEL_FORMAT;
        } else {
            for (int t = 0; t < n; t++)
                for (int i = 0, col = 0; i < count; col += widths[i], i++)
                    memcpy(outs[i] + (size_t)t * widths[i], y + (size_t)t * total + col,
                           sizeof(float) * widths[i]);
            rt_release(mark);
            return 0;
        }
        rt_release(mark);
    }
    for (int i = 0; i < count; i++) {
        int32_t rc = linear(r, layer, parts[i], ws[i], x, n, in, widths[i], outs[i]);
        if (rc < 0) return rc;
    }
    return 0;
}

/* out = x * rsqrt(mean(x^2) + eps) * w for each of the rows (x may be out). */
static void rms_norm(float *out, const float *x, const float *w, int rows, int n, float eps) {
    for (int i = 0; i < rows; i++) {
        const float *xr = x + (size_t)i * n;
        float *o = out + (size_t)i * n;
        double ss = 0;
        for (int j = 0; j < n; j++) ss += (double)xr[j] * xr[j];
        float scale = (float)(1.0 / rt_sqrt((double)((float)(ss / n) + eps)));
        for (int j = 0; j < n; j++) o[j] = xr[j] * scale * w[j];
    }
}

/* Rotary embedding of x (n, heads, head_dim) at positions start.. (llama: adjacent pairs;
 * gemma3: NeoX halves). Tables in float64 like the host's, then rounded to float. */
static void rope(Run *r, float *x, int n, int heads, int start, const double *inv_freq,
                 double scale) {
    const Config *c = &r->c;
    int hd = c->head_dim, half = hd / 2;
    for (int t = 0; t < n; t++) {
        double pos = (double)(start + t) / scale;
        for (int i = 0; i < half; i++) {
            double angle = pos * inv_freq[i];
            float cs = (float)rt_cos(angle), sn = (float)rt_sin(angle);
            for (int h = 0; h < heads; h++) {
                float *v = x + ((size_t)t * heads + h) * hd;
                int a = c->rope_neox ? i : 2 * i, b = c->rope_neox ? i + half : 2 * i + 1;
                float x0 = v[a], x1 = v[b];
                v[a] = x0 * cs - x1 * sn;
                v[b] = x1 * cs + x0 * sn;
            }
        }
    }
}

static int is_sliding(const Config *c, int layer) {
    if (!c->sliding_window) return 0;
    return !c->sliding_pattern || (layer + 1) % c->sliding_pattern != 0;
}

/* Causal attention of q (n, n_heads, hd) over the cache's positions [0, start + n):
 * writes att (n, n_heads * hd). One pair of products per KV head, its query heads stacked. */
static int32_t attention(Run *r, int layer, const float *q, int n, int start, float *att) {
    const Config *c = &r->c;
    int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, S = start + n, rows = group * n;
    int window = is_sliding(c, layer) ? c->sliding_window : 0;
    size_t mark = rt_mark();
    float *qg = (float *)rt_alloc(sizeof(float) * (size_t)rows * hd);    /* (group * n, hd) */
    float *kt = (float *)rt_alloc(sizeof(float) * (size_t)hd * S);       /* (hd, S) */
    float *sc = (float *)rt_alloc(sizeof(float) * (size_t)rows * S);     /* (group * n, S) */
    float *og = (float *)rt_alloc(sizeof(float) * (size_t)rows * hd);    /* (group * n, hd) */
    if (!qg || !kt || !sc || !og) return REALM_E_LIMIT_EXCEEDED;
    for (int kvh = 0; kvh < c->n_kv_heads; kvh++) {
        const float *keys = r->kc + (((size_t)layer * c->n_kv_heads + kvh) * r->ctx) * hd;
        const float *values = r->vc + (((size_t)layer * c->n_kv_heads + kvh) * r->ctx) * hd;
        for (int g = 0; g < group; g++)
            for (int t = 0; t < n; t++)
                memcpy(qg + ((size_t)g * n + t) * hd,
                       q + ((size_t)t * c->n_heads + kvh * group + g) * hd, sizeof(float) * hd);
        for (int s = 0; s < S; s++)
            for (int d = 0; d < hd; d++) kt[(size_t)d * S + s] = keys[(size_t)s * hd + d];
        int32_t rc = matmul(r, qg, kt, rows, hd, S, sc);
        if (rc < 0) return rc;
        for (int g = 0; g < group; g++) {
            for (int t = 0; t < n; t++) {
                float *row = sc + ((size_t)g * n + t) * S;
                int pos = start + t;
                int first = window && pos - window + 1 > 0 ? pos - window + 1 : 0;
                float max = -__builtin_inff();
                for (int s = first; s <= pos; s++) {
                    row[s] *= c->attn_scale;
                    if (row[s] > max) max = row[s];
                }
                double sum = 0;
                for (int s = 0; s < S; s++) {
                    if (s < first || s > pos) {
                        row[s] = 0.0f;
                        continue;
                    }
                    row[s] = rt_expf(row[s] - max);
                    sum += row[s];
                }
                float inv = (float)(1.0 / sum);
                for (int s = first; s <= pos; s++) row[s] *= inv;
            }
        }
        rc = matmul(r, sc, values, rows, S, hd, og);
        if (rc < 0) return rc;
        for (int g = 0; g < group; g++)
            for (int t = 0; t < n; t++)
                memcpy(att + ((size_t)t * c->n_heads + kvh * group + g) * hd,
                       og + ((size_t)g * n + t) * hd, sizeof(float) * hd);
    }
    rt_release(mark);
    return 0;
}

/* One forward step of n tokens at positions start..; writes the last token's logits. */
static int32_t forward(Run *r, const int32_t *tokens, int n, int start, float *logits) {
    const Config *c = &r->c;
    int dim = c->dim, hd = c->head_dim, nq = c->n_heads * hd, nkv = c->n_kv_heads * hd;
    int ffn = c->ffn_dim;
    size_t mark = rt_mark();
    float *x = (float *)rt_alloc(sizeof(float) * (size_t)n * dim);   /* (n, dim) residual */
    float *h = (float *)rt_alloc(sizeof(float) * (size_t)n * dim);   /* (n, dim) */
    float *q = (float *)rt_alloc(sizeof(float) * (size_t)n * nq);    /* (n, n_heads, hd) */
    float *k = (float *)rt_alloc(sizeof(float) * (size_t)n * nkv);   /* (n, n_kv_heads, hd) */
    float *v = (float *)rt_alloc(sizeof(float) * (size_t)n * nkv);
    float *att = (float *)rt_alloc(sizeof(float) * (size_t)n * nq);  /* (n, n_heads * hd) */
    float *gate = (float *)rt_alloc(sizeof(float) * (size_t)n * ffn); /* (n, ffn) */
    float *up = (float *)rt_alloc(sizeof(float) * (size_t)n * ffn);
    if (!x || !h || !q || !k || !v || !att || !gate || !up) return REALM_E_LIMIT_EXCEEDED;
    int32_t rc;

    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab) return REALM_E_INVALID_ARGUMENT;
        float *row = x + (size_t)t * dim;
        if (r->level == LEVEL_NAIVE) {
            memcpy(row, r->tok_embd + (size_t)tokens[t] * dim, sizeof(float) * dim);
        } else {
            rc = realm_tensor_read(r->model, "token_embd.weight", 17, (int64_t)tokens[t] * dim, dim, row);
            if (rc != dim) return fail("realm_tensor_read token_embd", rc < 0 ? rc : REALM_E_INTERNAL);
        }
        if (c->embed_scale != 1.0f)
            for (int j = 0; j < dim; j++) row[j] *= c->embed_scale;
    }

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &r->layers[l];
        rms_norm(h, x, L->attn_norm, n, dim, c->norm_eps);
        static const char *const qkv_parts[] = {"attn_q", "attn_k", "attn_v"};
        float *const qkv_w[] = {L->wq, L->wk, L->wv}, *const qkv_out[] = {q, k, v};
        const int qkv_widths[] = {nq, nkv, nkv};
        rc = linear_fused(r, l, "attn_qkv", 3, qkv_parts, qkv_w, qkv_out, qkv_widths, h, n, dim);
        if (rc < 0) return rc;
        if (c->qk_norm) {
            rms_norm(q, q, L->q_norm, n * c->n_heads, hd, c->norm_eps);
            rms_norm(k, k, L->k_norm, n * c->n_kv_heads, hd, c->norm_eps);
        }
        /* sliding-window layers use the local base, unscaled; the others the global one */
        int local = is_sliding(c, l) && r->inv_freq_local;
        const double *freqs = local ? r->inv_freq_local : r->inv_freq;
        double scale = local ? 1.0 : c->rope_scale;
        rope(r, q, n, c->n_heads, start, freqs, scale);
        rope(r, k, n, c->n_kv_heads, start, freqs, scale);
        for (int t = 0; t < n; t++) /* the cache is (layer, kv head, position, hd) */
            for (int kvh = 0; kvh < c->n_kv_heads; kvh++) {
                size_t at = (((size_t)l * c->n_kv_heads + kvh) * r->ctx + start + t) * hd;
                memcpy(r->kc + at, k + ((size_t)t * c->n_kv_heads + kvh) * hd, sizeof(float) * hd);
                memcpy(r->vc + at, v + ((size_t)t * c->n_kv_heads + kvh) * hd, sizeof(float) * hd);
            }
        if ((rc = attention(r, l, q, n, start, att)) < 0) return rc;
        if ((rc = linear(r, l, "attn_output", L->wo, att, n, nq, dim, h)) < 0) return rc;
        if (c->sandwich) rms_norm(h, h, L->post_attn_norm, n, dim, c->norm_eps);
        for (size_t i = 0; i < (size_t)n * dim; i++) x[i] += h[i];

        rms_norm(h, x, L->ffn_norm, n, dim, c->norm_eps);
        static const char *const ffn_parts[] = {"ffn_gate", "ffn_up"};
        float *const ffn_w[] = {L->wg, L->wu}, *const ffn_out[] = {gate, up};
        const int ffn_widths[] = {ffn, ffn};
        rc = linear_fused(r, l, "ffn_gate_up", 2, ffn_parts, ffn_w, ffn_out, ffn_widths, h, n, dim);
        if (rc < 0) return rc;
        for (size_t i = 0; i < (size_t)n * ffn; i++)
            gate[i] = (c->gelu ? rt_gelu_tanh(gate[i]) : rt_silu(gate[i])) * up[i];
        if ((rc = linear(r, l, "ffn_down", L->wd, gate, n, ffn, dim, h)) < 0) return rc;
        if (c->sandwich) rms_norm(h, h, L->post_ffn_norm, n, dim, c->norm_eps);
        for (size_t i = 0; i < (size_t)n * dim; i++) x[i] += h[i];
    }

    rms_norm(h, x + (size_t)(n - 1) * dim, r->out_norm, 1, dim, c->norm_eps);
    rc = linear(r, -1, c->tied ? "token_embd" : "output", r->output, h, 1, dim, c->vocab, logits);
    rt_release(mark);
    return rc < 0 ? rc : 0;
}

/* One forward step through the host's layers (level "layer"). */
static int32_t forward_layers(Run *r, int32_t session, const int32_t *tokens, int n, float *logits) {
    size_t mark = rt_mark();
    size_t count = (size_t)n * r->c.dim;
    float *x = (float *)rt_alloc(sizeof(float) * count); /* (n, dim) */
    if (!x) return REALM_E_LIMIT_EXCEEDED;
    int32_t rc = realm_embed(session, tokens, n, x, count);
    if (rc < 0) return fail("realm_embed", rc);
    for (int l = 0; l < r->c.n_layers; l++) {
        rc = realm_forward_layer(session, l, x, count);
        if (rc < 0) return fail("realm_forward_layer", rc);
    }
    rc = realm_logits(session, x, count, logits, (size_t)r->c.vocab);
    if (rc < 0) return fail("realm_logits", rc);
    rt_release(mark);
    return 0;
}

/* --- the request ------------------------------------------------------------------------- */

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* A string field of the request, decoded into fresh memory (NUL-terminated). 1 found,
 * 0 absent (or null), < 0 error. */
static int32_t request_string(const char *req, size_t n, const char *key, char **out, size_t *len) {
    rt_span v;
    int found = rt_json_get(req, n, key, &v);
    if (found < 0) return REALM_E_INVALID_ARGUMENT;
    if (!found || rt_json_is_null(v)) return 0;
    char *buf = (char *)rt_alloc(v.len + 1);
    if (!buf) return REALM_E_LIMIT_EXCEEDED;
    int64_t got = rt_json_string(v, buf);
    if (got < 0) {
        say(REALM_LOG_ERROR, "the request's field is not a string: ", key, INT64_MIN);
        return REALM_E_INVALID_ARGUMENT;
    }
    buf[got] = 0;
    *out = buf;
    *len = (size_t)got;
    return 1;
}

static int32_t parse_sha256(const char *hex, size_t len, uint8_t out[32]) {
    if (len != 64) return REALM_E_INVALID_ARGUMENT;
    for (int i = 0; i < 32; i++) {
        int hi = rt_hex(hex[2 * i]), lo = rt_hex(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return REALM_E_INVALID_ARGUMENT;
        out[i] = (uint8_t)(hi * 16 + lo);
    }
    return 0;
}

/* Emits a token and the text that became printable; the unfinished UTF-8 tail waits. */
typedef struct {
    unsigned char pending[64];
    size_t n;
} Utf8Buffer;

/* `strip_space`: drop one leading space (the first piece of an add_space_prefix model). */
static int32_t emit(int32_t model, int32_t token, Utf8Buffer *buf, int strip_space) {
    size_t mark = rt_mark();
    char small[256];
    char *bytes = small;
    int32_t len = realm_token_bytes(model, token, small, sizeof small);
    if (len < 0) return fail("realm_token_bytes", len);
    if ((size_t)len > sizeof small) {
        bytes = (char *)rt_alloc((size_t)len);
        if (!bytes) return REALM_E_LIMIT_EXCEEDED;
        int32_t again = realm_token_bytes(model, token, bytes, (size_t)len);
        if (again != len) return fail("realm_token_bytes", again < 0 ? again : REALM_E_INTERNAL);
    }
    if (strip_space && len > 0 && bytes[0] == ' ') bytes++, len--;
    size_t total = buf->n + (size_t)len;
    unsigned char *in = (unsigned char *)rt_alloc(total);
    char *text = (char *)rt_alloc(3 * total);
    if (!in || !text) return REALM_E_LIMIT_EXCEEDED;
    memcpy(in, buf->pending, buf->n);
    memcpy(in + buf->n, bytes, (size_t)len);
    size_t used;
    size_t out = rt_utf8_take(in, total, 0, text, &used);
    buf->n = total - used; /* at most 3 bytes: the start of one unfinished character */
    memcpy(buf->pending, in + used, buf->n);
    int32_t rc = realm_emit(token, text, out);
    rt_release(mark);
    return rc;
}

static int32_t run_generation(Run *r, const int32_t *prompt, int n_prompt, int max_tokens,
                              int model_ctx, int add_space_prefix) {
    const Config *c = &r->c;
    int budget = model_ctx - n_prompt < max_tokens ? model_ctx - n_prompt : max_tokens;
    int32_t session = -1, rc = 0;
    float *logits = (float *)rt_alloc(sizeof(float) * (size_t)c->vocab);
    if (!logits) return REALM_E_LIMIT_EXCEEDED;
    r->ctx = n_prompt + budget;
    if (r->level == LEVEL_LAYER) {
        session = realm_session_open(r->model, r->ctx);
        if (session < 0) return fail("realm_session_open", session);
    } else {
        size_t cache = (size_t)c->n_layers * c->n_kv_heads * r->ctx * c->head_dim;
        r->kc = (float *)rt_zalloc(sizeof(float) * cache);
        r->vc = (float *)rt_zalloc(sizeof(float) * cache);
        r->inv_freq = rope_freqs(c->head_dim, c->rope_base);
        if (c->sliding_window && c->rope_base_local > 0)
            r->inv_freq_local = rope_freqs(c->head_dim, c->rope_base_local);
        if (!r->kc || !r->vc || !r->inv_freq) return REALM_E_LIMIT_EXCEEDED;
    }

    int pos = 0, generated = 0, reason = REALM_FINISH_LENGTH;
    Utf8Buffer utf8 = {{0}, 0};
    int32_t next;
    const int32_t *step = prompt;
    int step_n = n_prompt;
    while (1) {
        for (int i = 0; i < step_n; i += PREFILL_CHUNK) { /* the prompt in pieces */
            int n = step_n - i < PREFILL_CHUNK ? step_n - i : PREFILL_CHUNK;
            rc = r->level == LEVEL_LAYER ? forward_layers(r, session, step + i, n, logits)
                                         : forward(r, step + i, n, pos, logits);
            if (rc < 0) goto done;
            pos += n;
        }
        if (generated >= budget) break;
        next = argmax(logits, c->vocab);
        rc = realm_token_is_end(r->model, next);
        if (rc < 0) {
            fail("realm_token_is_end", rc);
            goto done;
        }
        if (rc) {
            reason = REALM_FINISH_STOP;
            break;
        }
        generated++;
        rc = emit(r->model, next, &utf8, add_space_prefix && generated == 1);
        if (rc < 0) goto done; /* REALM_E_CANCELLED included: the caller left */
        if (generated >= budget) break;
        step = &next;
        step_n = 1;
    }
    if (utf8.n) { /* an unfinished character at the very end: show it replaced */
        char text[3 * sizeof utf8.pending];
        size_t used, out = rt_utf8_take(utf8.pending, utf8.n, 1, text, &used);
        rc = realm_emit(-1, text, out);
        if (rc < 0) goto done;
    }
    static const char *const level_names[] = {"layer", "op", "naive"};
    const int64_t counts[4] = {r->host_weight, r->guest_weight, r->host_matmul, r->guest_matmul};
    log_counts(level_names[r->level], counts);
    rc = realm_finish(reason, n_prompt, generated);
    if (rc < 0) fail("realm_finish", rc);
done:
    if (session >= 0) realm_session_close(session);
    return rc < 0 ? rc : 0;
}

__attribute__((export_name("realm_guest_abi"))) int32_t realm_guest_abi(void) {
    return REALM_ABI_VERSION;
}

__attribute__((export_name("generate"))) int32_t generate(void) {
    rt_reset();
    int32_t rc;

    int32_t size = realm_request_read(NULL, 0);
    if (size < 0) return fail("realm_request_read", size);
    char *req = (char *)rt_alloc((size_t)size + 1);
    if (!req) return REALM_E_LIMIT_EXCEEDED;
    rc = realm_request_read(req, (size_t)size);
    if (rc != size) return fail("realm_request_read", rc < 0 ? rc : REALM_E_INTERNAL);

    char *model_name = NULL, *sha_hex = NULL, *prompt = NULL, *level_name = NULL;
    size_t model_len = 0, sha_len = 0, prompt_len = 0, level_len = 0;
    if ((rc = request_string(req, (size_t)size, "model", &model_name, &model_len)) <= 0) {
        say(REALM_LOG_ERROR, "the request has no \"model\"", "", INT64_MIN);
        return rc < 0 ? rc : REALM_E_INVALID_ARGUMENT;
    }
    if ((rc = request_string(req, (size_t)size, "model_sha256", &sha_hex, &sha_len)) < 0) return rc;
    if ((rc = request_string(req, (size_t)size, "prompt", &prompt, &prompt_len)) < 0) return rc;
    if ((rc = request_string(req, (size_t)size, "level", &level_name, &level_len)) < 0) return rc;
    rt_span messages, max_span;
    if (rt_json_get(req, (size_t)size, "messages", &messages) < 0) return REALM_E_INVALID_ARGUMENT;
    int max_tokens = DEFAULT_MAX_TOKENS;
    if (rt_json_get(req, (size_t)size, "max_tokens", &max_span) == 1 && !rt_json_is_null(max_span)) {
        double v;
        if (rt_json_number(max_span, &v) < 0 || v < 0 || v > 1e9 || v != (double)(int)v) {
            say(REALM_LOG_ERROR, "max_tokens must be a non-negative integer", "", INT64_MIN);
            return REALM_E_INVALID_ARGUMENT;
        }
        max_tokens = (int)v;
    }

    static realm_model_info info; /* static: the host writes it, aligned, in our memory */
    rc = realm_store_model_by_name(model_name, model_len, &info);
    if (rc < 0) return fail("realm_store_model_by_name", rc);
    uint8_t expected[32];
    if (sha_hex) {
        if (parse_sha256(sha_hex, sha_len, expected) < 0) {
            say(REALM_LOG_ERROR, "model_sha256 must be 64 hex digits", "", INT64_MIN);
            return REALM_E_INVALID_ARGUMENT;
        }
    } else {
        memcpy(expected, info.sha256, 32);
    }
    rc = realm_validate_model_id((int32_t)info.id, expected);
    if (rc < 0) return fail("realm_validate_model_id", rc);
    int32_t model = (int32_t)info.id;

    if (!prompt && messages.p && !rt_json_is_null(messages)) {
        int32_t need = realm_chat_template(model, messages.p, messages.len, NULL, 0);
        if (need < 0) return fail("realm_chat_template", need);
        prompt = (char *)rt_alloc((size_t)need + 1);
        if (!prompt) return REALM_E_LIMIT_EXCEEDED;
        rc = realm_chat_template(model, messages.p, messages.len, prompt, (size_t)need);
        if (rc < 0) return fail("realm_chat_template", rc);
        prompt_len = (size_t)rc;
    }
    if (!prompt) {
        say(REALM_LOG_ERROR, "the request has neither \"prompt\" nor \"messages\"", "", INT64_MIN);
        return REALM_E_INVALID_ARGUMENT;
    }

    int32_t flags = REALM_TOKENIZE_ADD_BOS | REALM_TOKENIZE_PARSE_SPECIAL;
    int32_t n_prompt = realm_tokenize(model, prompt, prompt_len, flags, NULL, 0);
    if (n_prompt < 0) return fail("realm_tokenize", n_prompt);
    int32_t *tokens = (int32_t *)rt_alloc(sizeof(int32_t) * (size_t)(n_prompt + 1));
    if (!tokens) return REALM_E_LIMIT_EXCEEDED;
    rc = realm_tokenize(model, prompt, prompt_len, flags, tokens, (size_t)n_prompt);
    if (rc != n_prompt) return fail("realm_tokenize", rc < 0 ? rc : REALM_E_INTERNAL);
    if (n_prompt == 0) {
        say(REALM_LOG_ERROR, "the prompt is empty", "", INT64_MIN);
        return REALM_E_INVALID_ARGUMENT;
    }
    if ((uint32_t)n_prompt >= info.context_length) {
        say(REALM_LOG_ERROR, "the prompt does not fit the model's context; tokens:", "", n_prompt);
        return REALM_E_CONTEXT_OVERFLOW;
    }

    Run *r = (Run *)rt_zalloc(sizeof(Run));
    if (!r) return REALM_E_LIMIT_EXCEEDED;
    r->model = model;
    r->backend = realm_get_backend_type();
    if (r->backend < 0) return fail("realm_get_backend_type", r->backend);
    const char *lv = level_name ? level_name : "auto";
    size_t lv_len = level_name ? level_len : 4;
#define IS(lit) (lv_len == sizeof(lit) - 1 && rt_memeq(lv, lit, lv_len))
    if (IS("layer")) r->level = LEVEL_LAYER;
    else if (IS("op")) r->level = LEVEL_OP;
    else if (IS("naive")) r->level = LEVEL_NAIVE;
    else if (IS("auto")) r->level = r->backend == REALM_BACKEND_NONE ? LEVEL_NAIVE : LEVEL_OP;
    else {
        say(REALM_LOG_ERROR, "unknown level (layer, op, naive or auto): ", lv, INT64_MIN);
        return REALM_E_INVALID_ARGUMENT;
    }
#undef IS
    say(REALM_LOG_DEBUG, "host backend type", "", r->backend);

    int32_t info_len = realm_get_model_info(model, NULL, 0);
    if (info_len < 0) return fail("realm_get_model_info", info_len);
    char *info_json = (char *)rt_alloc((size_t)info_len + 1);
    if (!info_json) return REALM_E_LIMIT_EXCEEDED;
    rc = realm_get_model_info(model, info_json, (size_t)info_len);
    if (rc != info_len) return fail("realm_get_model_info", rc < 0 ? rc : REALM_E_INTERNAL);
    int add_space_prefix = info_flag(info_json, (size_t)info_len, "add_space_prefix", 0);

    r->c.n_layers = (int)info.n_layers;
    r->c.dim = (int)info.dim;
    r->c.vocab = (int)info.vocab_size;
    if (r->level != LEVEL_LAYER) {
        if ((rc = load_config(r, &info, info_json, (size_t)info_len)) < 0) return rc;
        if ((rc = load_weights(r)) < 0) return rc;
    }
    return run_generation(r, tokens, n_prompt, max_tokens, (int)info.context_length, add_space_prefix);
}
