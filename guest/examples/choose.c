/*
 * choose.c: an example guest that answers with one of a fixed set of answers: the one the
 * model finds most likely after the prompt.
 *
 * A classifier a tenant can trust to say nothing else (ANSWERS below). For each answer it
 * feeds the answer's tokens after the prompt, one step each, and adds up their
 * log-probabilities; then it backs the session up to the end of the prompt
 * (realm_session_backup: the host drops those tokens, and their place in the KV cache is
 * written over by the next answer's), so the prompt is run once whatever the number of
 * answers. It emits the best one. The request, the model's identity and the prompt are
 * handled by the default guest's code (included below).
 *
 * Build: `realm guest build --all` or `realm guest build guest/examples/choose.c`.
 */
#include "realm.h"

#define generate default_generate
#include "../default.c"
#undef generate

static const char *const ANSWERS[] = {"positive", "negative", "neutral"};
#define N_ANSWERS (sizeof ANSWERS / sizeof ANSWERS[0])
#define MAX_ANSWER_TOKENS 32

/* log softmax(logits)[token], in double */
static double log_prob(const float *logits, int32_t vocab, int32_t token) {
    double m = logits[argmax(logits, vocab)], total = 0;
    for (int32_t i = 0; i < vocab; i++) total += rt_exp((double)logits[i] - m);
    return (double)logits[token] - m - rt_log(total);
}

/* The log-probability of `answer`'s n tokens after what the session holds (whose last
 * logits are `after_prompt`); the session is backed up to where it was. */
static int32_t score(int32_t session, const model_ref *m, const float *after_prompt, float *logits,
                     const int32_t *tokens, int32_t n, double *out) {
    int32_t rc;
    double lp = log_prob(after_prompt, m->vocab, tokens[0]);
    for (int32_t j = 1; j < n; j++) {
        if ((rc = realm_forward(session, &tokens[j - 1], 1, logits, (size_t)m->vocab)) < 0) return rc;
        lp += log_prob(logits, m->vocab, tokens[j]);
    }
    if (n > 1 && (rc = realm_session_backup(session, n - 1)) < 0) return rc;
    *out = lp;
    return 0;
}

static int32_t choose(void) {
    int32_t rc, size = realm_request_read(NULL, 0);
    if (size < 0) return size;
    char *json = (char *)rt_alloc((size_t)size + 1);
    if (!json) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the request", NULL);
    if ((rc = realm_request_read(json, (size_t)size)) < 0) return rc;
    request req;
    model_ref m;
    int32_t *history;
    if ((rc = parse_request(json, (size_t)size, &req)) || (rc = model_open(&req, &m)) < 0) return rc;
    int32_t n_prompt = prompt_tokens(json, (size_t)size, &req, &m, &history);
    if (n_prompt < 0) return n_prompt;
    if (n_prompt + MAX_ANSWER_TOKENS > m.ctx) return fail(REALM_E_CONTEXT_OVERFLOW, "no room for an answer", NULL);

    float *first = (float *)rt_alloc((size_t)m.vocab * sizeof(float));
    float *logits = (float *)rt_alloc((size_t)m.vocab * sizeof(float));
    if (!first || !logits) return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the logits", NULL);
    int32_t session = realm_session_open(m.id, n_prompt + MAX_ANSWER_TOKENS);
    if (session < 0) return session;
    if ((rc = realm_forward(session, history, n_prompt, first, (size_t)m.vocab)) < 0) return rc;

    int32_t tokens[N_ANSWERS][MAX_ANSWER_TOKENS], counts[N_ANSWERS], best = 0;
    double best_lp = 0;
    for (size_t a = 0; a < N_ANSWERS; a++) {
        int32_t n = realm_tokenize(m.id, ANSWERS[a], rt_strlen(ANSWERS[a]), 0, tokens[a], MAX_ANSWER_TOKENS);
        if (n <= 0 || n > MAX_ANSWER_TOKENS) return n < 0 ? n : fail(REALM_E_INTERNAL, "an answer does not tokenize", NULL);
        counts[a] = n;
        double lp;
        if ((rc = score(session, &m, first, logits, tokens[a], n, &lp)) < 0) return rc;
        if (a == 0 || lp > best_lp) best = (int32_t)a, best_lp = lp;
    }
    realm_session_close(session);

    int32_t shown = counts[best] < req.p.max_tokens ? counts[best] : (int32_t)req.p.max_tokens;
    for (int32_t j = 0; j < shown; j++) {
        char piece[256];
        int32_t len = realm_token_bytes(m.id, tokens[best][j], piece, sizeof piece);
        if (len < 0) return len;
        if (len > (int32_t)sizeof piece) return fail(REALM_E_INTERNAL, "a token of an answer is too long", NULL);
        if ((rc = realm_emit(tokens[best][j], piece, (size_t)len)) < 0) return rc;
    }
    return realm_finish(shown == counts[best] ? REALM_FINISH_STOP : REALM_FINISH_LENGTH, n_prompt, shown);
}

int32_t generate(void) {
    rt_reset();
    int32_t rc = choose();
    return rc < 0 ? rc : 0;
}
