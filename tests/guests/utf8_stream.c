/*
 * Test guest: the default guest's streaming UTF-8 decoder, on its own.
 *
 * The request is binary: a u32 count of chunks, that many u32 chunk lengths, then the
 * bytes. Each chunk is pushed through the decoder and what it makes printable is emitted
 * (token = chunk index); the final flush is emitted with token -1.
 */
#define generate default_generate
#define realm_guest_abi default_realm_guest_abi
#include "../../guest/default.c"
#undef generate
#undef realm_guest_abi

int32_t realm_guest_abi(void) { return REALM_ABI_VERSION; }

int32_t generate(void) {
    rt_reset();
    int32_t size = realm_request_read(NULL, 0);
    unsigned char *req = (unsigned char *)rt_alloc((size_t)size);
    if (!req || realm_request_read((char *)req, (size_t)size) != size) return REALM_E_INTERNAL;
    uint32_t n;
    __builtin_memcpy(&n, req, 4);
    const unsigned char *lens = req + 4, *bytes = req + 4 + 4 * (size_t)n;
    utf8_dec dec = {{0}, 0};
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len;
        __builtin_memcpy(&len, lens + 4 * (size_t)i, 4);
        text_buf out = {0};
        utf8_push(&dec, (const char *)bytes, len, &out);
        realm_emit((int32_t)i, out.data, out.len);
        bytes += len;
    }
    text_buf out = {0};
    utf8_flush(&dec, &out);
    realm_emit(-1, out.data, out.len);
    return 0;
}
