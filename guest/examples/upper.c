/*
 * upper.c: an example guest that answers in upper case.
 *
 * It is the default guest (guest/default.c: same request, sampling, stop strings and
 * usage) with one change: every piece of text it emits has its ASCII letters upper-cased
 * before it reaches the host. The model still sees its own tokens: only the output shown
 * to the caller changes. It shows how a tenant layers custom behaviour on the default
 * generation loop without copying it: wrap an import, include the loop.
 *
 * Build: `realm guest build --all` (builds guest/examples/ too) or
 *        `realm guest build guest/examples/upper.c`.
 */
#include "realm.h"

static int32_t upper_emit(int32_t token, const char *text, size_t len);

/* default.c's calls to realm_emit go through upper_emit (realm.h is already included, so
 * the import itself keeps its name). */
#define realm_emit upper_emit
#include "../default.c"
#undef realm_emit

static int32_t upper_emit(int32_t token, const char *text, size_t len) {
    char small[256];
    char *out = len <= sizeof small ? small : (char *)rt_alloc(len);
    if (!out) return REALM_E_LIMIT_EXCEEDED;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        out[i] = (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c;
    }
    return realm_emit(token, out, len);
}
