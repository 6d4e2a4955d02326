/* realm-target: wasm64
 *
 * dispatch64.c: guest/dispatch.c built for wasm64 (memory64). The source is the same:
 * realm.h declares pointers and sizes as C pointers and size_t, which are 64-bit here, so
 * the imports take i64 addresses and the guest can address more than 4 GiB.
 */
#include "dispatch.c"
