/*
 * realm.h: the Realm guest ABI, version 1.3. docs/ABI.md is the full contract.
 *
 * Every function is imported from module "env" and returns int32_t: >= 0 is a result
 * (a count, a handle, an id), < 0 is one of the REALM_E_* codes below. Pointers are
 * guest linear-memory addresses (32-bit in wasm32, 64-bit in wasm64); the host checks
 * every pointer and length against the guest's memory and never writes past a capacity
 * the guest passed. The host never allocates in guest memory. A `cap` counts elements of
 * the type its pointer points to (bytes for char / uint8_t, floats for float, int32s for
 * int32_t); a `len` of text counts bytes.
 *
 * A guest exports `memory`, `realm_guest_abi` (returns REALM_ABI_VERSION it was built
 * for) and `generate` (runs one request; returns 0 or a REALM_E_* code).
 */
#ifndef REALM_H
#define REALM_H

#include <stddef.h>
#include <stdint.h>

#define REALM_ABI_MAJOR 1
#define REALM_ABI_MINOR 3
#define REALM_ABI_VERSION ((REALM_ABI_MAJOR << 16) | REALM_ABI_MINOR)

/* Error codes (realm/errors.py is the one table on the host). */
#define REALM_E_INVALID_ARGUMENT -1
#define REALM_E_OUT_OF_BOUNDS -2
#define REALM_E_UNKNOWN_MODEL -3
#define REALM_E_HASH_MISMATCH -4
#define REALM_E_PERMISSION_DENIED -5
#define REALM_E_MODEL_FORMAT -6
#define REALM_E_UNSUPPORTED -7
#define REALM_E_CONTEXT_OVERFLOW -8
#define REALM_E_LIMIT_EXCEEDED -9
#define REALM_E_GUEST_FAULT -10
#define REALM_E_BACKEND_UNAVAILABLE -11
#define REALM_E_NOT_FOUND -12
#define REALM_E_FETCH -13
#define REALM_E_ABI_VERSION -14
#define REALM_E_INTERNAL -15
#define REALM_E_CANCELLED -16 /* the caller went away: stop generating, return */

/* realm_get_backend_type() */
#define REALM_BACKEND_CPU 0
#define REALM_BACKEND_GPU 1
#define REALM_BACKEND_NONE 2

/* realm_tokenize flags */
#define REALM_TOKENIZE_ADD_BOS 1     /* add BOS if the model's rule says so */
#define REALM_TOKENIZE_PARSE_SPECIAL 2

/* realm_log levels */
#define REALM_LOG_DEBUG 0
#define REALM_LOG_INFO 1
#define REALM_LOG_WARN 2
#define REALM_LOG_ERROR 3

/* Finish reasons for realm_finish */
#define REALM_FINISH_STOP 0   /* EOS / end of turn / stop string */
#define REALM_FINISH_LENGTH 1 /* max_tokens or context full */

/* What realm_store_model / realm_store_model_by_name write at info_ptr (little endian,
 * 64 bytes, no padding surprises: every field naturally aligned). */
typedef struct realm_model_info {
    uint32_t id;             /*  0: sequential from 1, never reused */
    uint32_t architecture;   /*  4: 1 = llama, 2 = gemma3 */
    uint8_t sha256[32];      /*  8: SHA-256 of the GGUF content */
    uint32_t vocab_size;     /* 40 */
    uint32_t context_length; /* 44 */
    uint32_t n_layers;       /* 48 */
    uint32_t dim;            /* 52: embedding length (hidden state width) */
    uint32_t bos_id;         /* 56: 0xFFFFFFFF if none */
    uint32_t eos_id;         /* 60: 0xFFFFFFFF if none */
} realm_model_info;

#define REALM_IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

/* --- version, backend, logging ----------------------------------------------------- */
REALM_IMPORT(realm_abi_version) int32_t realm_abi_version(void);
REALM_IMPORT(realm_get_backend_type) int32_t realm_get_backend_type(void);
REALM_IMPORT(realm_log) int32_t realm_log(int32_t level, const char *msg, size_t len);

/* --- the request and its output --------------------------------------------------- */
/* The request as UTF-8 JSON (docs/ABI.md: "The request"). Returns its size in bytes;
 * with cap < size nothing is written, so call once with cap 0 to learn the size. */
REALM_IMPORT(realm_request_read) int32_t realm_request_read(char *buf, size_t cap);
/* One generated token and the text it made printable (may be empty). The host streams
 * text to the caller. REALM_E_CANCELLED means the caller left: return from generate. */
REALM_IMPORT(realm_emit) int32_t realm_emit(int32_t token, const char *text, size_t len);
/* Ends the output: why generation stopped, and the real token counts. */
REALM_IMPORT(realm_finish) int32_t realm_finish(int32_t reason, int32_t prompt_tokens, int32_t completion_tokens);

/* --- model identity ------------------------------------------------------------------ */
REALM_IMPORT(realm_store_model) int32_t realm_store_model(const uint8_t *gguf, size_t len, realm_model_info *info);
REALM_IMPORT(realm_store_model_by_name) int32_t realm_store_model_by_name(const char *name, size_t len, realm_model_info *info);
/* 0 ok; REALM_E_UNKNOWN_MODEL (never issued); REALM_E_NOT_FOUND (issued, but this guest
 * does not hold it: released); REALM_E_HASH_MISMATCH; REALM_E_PERMISSION_DENIED. */
REALM_IMPORT(realm_validate_model_id) int32_t realm_validate_model_id(int32_t id, const uint8_t *sha256);
/* Model info as JSON; returns its size (writes nothing if cap is too small). */
REALM_IMPORT(realm_get_model_info) int32_t realm_get_model_info(int32_t id, char *out, size_t cap);
REALM_IMPORT(realm_release_model) int32_t realm_release_model(int32_t id);

/* --- tokenizer and chat template ------------------------------------------------------ */
/* Returns the number of tokens; if > cap nothing is written. */
REALM_IMPORT(realm_tokenize) int32_t realm_tokenize(int32_t model, const char *text, size_t len, int32_t flags, int32_t *out, size_t cap);
/* The bytes token `token` contributes to the text (maybe a partial UTF-8 sequence). */
REALM_IMPORT(realm_token_bytes) int32_t realm_token_bytes(int32_t model, int32_t token, char *out, size_t cap);
/* 1 if the token ends generation (EOS or end of turn), else 0. */
REALM_IMPORT(realm_token_is_end) int32_t realm_token_is_end(int32_t model, int32_t token);
/* The whole vocabulary at once (ABI 1.1), for a guest that detokenizes, or looks at every
 * token's text, without a host call per token. Returns its size; writes it if it fits:
 *   uint32_t n; uint32_t offsets[n + 1]; uint8_t flags[n]; then the bytes of every token,
 * token i's being bytes[offsets[i] .. offsets[i + 1]) (as realm_token_bytes gives them) and
 * flags[i] & REALM_TOKEN_END set if it ends generation (as realm_token_is_end says). */
#define REALM_TOKEN_END 1
REALM_IMPORT(realm_vocab) int32_t realm_vocab(int32_t model, uint8_t *out, size_t cap);
/* messages: JSON array of {role, content}. Writes the rendered prompt, returns its size. */
REALM_IMPORT(realm_chat_template) int32_t realm_chat_template(int32_t model, const char *messages, size_t len, char *out, size_t cap);

/* --- level 1: whole forward step -------------------------------------------------------- */
/* A session holds a sequence's KV cache on the host; owned by this guest instance. */
REALM_IMPORT(realm_session_open) int32_t realm_session_open(int32_t model, int32_t context_length);
REALM_IMPORT(realm_session_close) int32_t realm_session_close(int32_t session);
/* Runs n tokens; writes the last position's logits (vocab_size floats) to logits. */
REALM_IMPORT(realm_forward) int32_t realm_forward(int32_t session, const int32_t *tokens, int32_t n, float *logits, size_t cap);
/* (ABI 1.3) realm_forward, but writes only the k (1..REALM_MAX_TOP) best tokens of the last
 * position and their logits, best first (equal logits: the lower id first), for a sampler
 * that looks no further (greedy, top-k). Returns how many (fewer when fewer are allowed).
 * Under a bound grammar (and no one-step mask or bias) a greedy step (k = 1) checks the
 * grammar lazily. */
#define REALM_MAX_TOP 64
REALM_IMPORT(realm_forward_top) int32_t realm_forward_top(int32_t session, const int32_t *tokens, int32_t n, int32_t k, int32_t *ids, float *logits);
/* (ABI 1.2) The log-probability of `token` under the model's distribution at the session's
 * last step (log-softmax of its raw logits) and the n_top (0..REALM_MAX_TOP_LOGPROBS) most
 * likely tokens', computed on the host and attached to the next realm_emit, which must emit
 * `token`: what OpenAI's `logprobs` reports. */
#define REALM_MAX_TOP_LOGPROBS 20
REALM_IMPORT(realm_logprobs) int32_t realm_logprobs(int32_t session, int32_t token, int32_t n_top);

/* --- level 2: per layer (hidden states live in guest memory, f32 row-major) ------------- */
/* Starts a step of n tokens: writes their embeddings x (n * dim floats). */
REALM_IMPORT(realm_embed) int32_t realm_embed(int32_t session, const int32_t *tokens, int32_t n, float *x, size_t cap);
/* x (n * dim) <- layer(x), in place; keys/values go to the session's cache. */
REALM_IMPORT(realm_forward_layer) int32_t realm_forward_layer(int32_t session, int32_t layer, float *x, size_t cap);
/* Final norm + output projection of x's last row; ends the step. */
REALM_IMPORT(realm_logits) int32_t realm_logits(int32_t session, const float *x, size_t x_cap, float *logits, size_t cap);

/* --- level 3: per operation --------------------------------------------------------------- */
/* c (m x n) = a (m x k) @ b (k x n), row-major f32, all in guest memory: the guest's own arithmetic,
 * on its thread and one core, counted in its CPU time (docs/ABI.md). */
REALM_IMPORT(realm_matmul_cpu) int32_t realm_matmul_cpu(const float *a, const float *b, int32_t m, int32_t k, int32_t n, float *c);
REALM_IMPORT(realm_matmul_gpu) int32_t realm_matmul_gpu(const float *a, const float *b, int32_t m, int32_t k, int32_t n, float *c);
/* c (m x out) = x (m x in) @ W^T for a weight the host holds: W never enters guest memory.
 * Returns out (the weight's rows). */
REALM_IMPORT(realm_matmul_weight) int32_t realm_matmul_weight(int32_t model, const char *tensor, size_t name_len, const float *x, int32_t m, float *c, size_t cap);

/* --- level 4: naive (the guest computes in WASM) ------------------------------------------- */
/* Writes up to 4 dims (row-major order: rows first) at dims; returns the number of dims. */
REALM_IMPORT(realm_tensor_shape) int32_t realm_tensor_shape(int32_t model, const char *tensor, size_t name_len, int64_t *dims);
/* Dequantized f32 elements [offset, offset + count) of the tensor (row-major), at most
 * REALM_MAX_TRANSFER bytes per call. Returns the count written. */
REALM_IMPORT(realm_tensor_read) int32_t realm_tensor_read(int32_t model, const char *tensor, size_t name_len, int64_t offset, int32_t count, float *out);

/* --- programmable decoding (ABI 1.2) ------------------------------------------------------
 * The host's grammar engine (llguidance). A constraint is JSON (docs/ABI.md, "Constraints"):
 * {"type":"json_object"}, {"type":"json_schema","schema":{...}}, {"type":"regex","pattern":"..."},
 * {"type":"grammar","gbnf":"..."}, {"type":"lark","lark":"..."}. A grammar handle belongs to
 * this guest and is freed when its request ends. A mask is one bit per token, 32 to a
 * uint32_t word: token i is allowed when (mask[i / 32] >> (i % 32)) & 1. */
#define REALM_GRAMMAR_ACCEPTING 1 /* the text so far is complete: an end token is allowed */
#define REALM_GRAMMAR_DONE 2      /* nothing may follow but an end token */
/* Compiles a constraint for a model: a grammar handle (> 0) in its start state. */
REALM_IMPORT(realm_grammar_compile) int32_t realm_grammar_compile(int32_t model, const char *constraint, size_t len);
REALM_IMPORT(realm_grammar_free) int32_t realm_grammar_free(int32_t grammar);
/* The tokens allowed next as a bitmask; returns its size in words, writes it if it fits. */
REALM_IMPORT(realm_grammar_mask) int32_t realm_grammar_mask(int32_t grammar, uint32_t *mask, size_t cap);
/* Takes n tokens (all or none): the REALM_GRAMMAR_* status after them. n = 0 asks the status. */
REALM_IMPORT(realm_grammar_consume) int32_t realm_grammar_consume(int32_t grammar, const int32_t *tokens, int32_t n);
/* The tokens the grammar forces next (fast-forward them with one realm_forward); returns the count. */
REALM_IMPORT(realm_grammar_forced) int32_t realm_grammar_forced(int32_t grammar, int32_t *out, size_t cap);
/* Forgets the last n tokens taken. */
REALM_IMPORT(realm_grammar_rollback) int32_t realm_grammar_rollback(int32_t grammar, int32_t n);
/* Per-step control of a session's logits, applied by the host to this session's row only.
 * set_grammar: every later realm_forward's logits are masked by the grammar's state (0 unbinds).
 * set_mask / set_bias: the next realm_forward only (n_words 0 / n 0 clears). Bias -inf bans. */
REALM_IMPORT(realm_session_set_grammar) int32_t realm_session_set_grammar(int32_t session, int32_t grammar);
REALM_IMPORT(realm_session_set_mask) int32_t realm_session_set_mask(int32_t session, const uint32_t *mask, size_t n_words);
REALM_IMPORT(realm_session_set_bias) int32_t realm_session_set_bias(int32_t session, const int32_t *tokens, const float *bias, int32_t n);
/* Drops the session's last n tokens (their KV entries are overwritten by the next step);
 * returns the tokens it holds now. */
REALM_IMPORT(realm_session_backup) int32_t realm_session_backup(int32_t session, int32_t n);

#define REALM_MAX_TRANSFER (64 * 1024 * 1024)

#endif
