/*
 * regex.c: an example guest whose every answer matches a regular expression of its own.
 *
 * The tenant decides the shape of the output, whatever the client asks: here a verdict,
 * then a short reason, then a full stop (ANSWER below). It is the default guest (request,
 * sampling, stop strings, usage) with its steps wrapped: the host's grammar engine compiles
 * the regex once per request (realm_grammar_compile), and before each step the guest
 * takes the token it is about to feed (realm_grammar_consume), asks the mask of the tokens
 * allowed next (realm_grammar_mask: a bitmask in this guest's memory, one bit a token)
 * and hands it to the session (realm_session_set_mask), which applies it to that step's
 * logits only: the bitmask crosses the boundary twice a step, never a call per token.
 * Once the regex is complete, only an end token is allowed, so the answer ends there.
 *
 * Build: `realm guest build --all` or `realm guest build guest/examples/regex.c`.
 */
#include "realm.h"

#define ANSWER "{\"type\": \"regex\", \"pattern\": \"(Yes|No), because [a-z ,']{1,80}\\\\.\"}"

static int32_t regex_session_open(int32_t model, int32_t context_length);
static int32_t regex_forward(int32_t session, const int32_t *tokens, int32_t n, float *logits, size_t cap);
static int32_t regex_forward_top(int32_t session, const int32_t *tokens, int32_t n, int32_t k, int32_t *ids, float *logits);

#define realm_session_open regex_session_open
#define realm_forward regex_forward
#define realm_forward_top regex_forward_top
#include "../default.c"
#undef realm_session_open
#undef realm_forward
#undef realm_forward_top

static int32_t answer_grammar, fed, words; /* this request's grammar, steps fed so far, mask size */
static uint32_t *mask;

/* The session of the request: its model's grammar is compiled here. */
static int32_t regex_session_open(int32_t model, int32_t context_length) {
    answer_grammar = realm_grammar_compile(model, ANSWER, sizeof ANSWER - 1);
    if (answer_grammar < 0) return answer_grammar;
    if ((words = realm_grammar_mask(answer_grammar, NULL, 0)) < 0) return words;
    if (!(mask = (uint32_t *)rt_alloc((size_t)words * sizeof(uint32_t))))
        return fail(REALM_E_LIMIT_EXCEEDED, "no memory for the mask", NULL);
    fed = 0;
    return realm_session_open(model, context_length);
}

/* Every step after the prompt feeds one generated token: the grammar takes it first. Then
 * the mask of what may follow goes to the session for this step's logits. */
static int32_t before_step(int32_t session, const int32_t *tokens, int32_t n) {
    int32_t rc;
    if (fed++ > 0 && (rc = realm_grammar_consume(answer_grammar, tokens, n)) < 0) return rc;
    if ((rc = realm_grammar_mask(answer_grammar, mask, (size_t)words)) < 0) return rc;
    return realm_session_set_mask(session, mask, (size_t)words);
}

static int32_t regex_forward(int32_t session, const int32_t *tokens, int32_t n, float *logits, size_t cap) {
    int32_t rc = before_step(session, tokens, n);
    return rc < 0 ? rc : realm_forward(session, tokens, n, logits, cap);
}

/* The step the default guest takes when it samples among the best few (greedy, top-k). */
static int32_t regex_forward_top(int32_t session, const int32_t *tokens, int32_t n, int32_t k, int32_t *ids, float *logits) {
    int32_t rc = before_step(session, tokens, n);
    return rc < 0 ? rc : realm_forward_top(session, tokens, n, k, ids, logits);
}
