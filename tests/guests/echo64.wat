;; A wasm64 (memory64) guest: pointers and sizes are i64. Emits the request back as one
;; piece of text (token 1), then reports an out-of-bounds pointer above 4 GiB (token 2
;; for REALM_E_OUT_OF_BOUNDS).
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_request_read" (func $read (param i64 i64) (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i64 i64) (result i32)))
  (memory (export "memory") i64 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $n i32)
    (local.set $n (call $read (i64.const 0) (i64.const 0)))
    (drop (call $read (i64.const 1024) (i64.extend_i32_u (local.get $n))))
    (drop (call $emit (i32.const 1) (i64.const 1024) (i64.extend_i32_u (local.get $n))))
    (drop (call $emit
      (i32.sub (i32.const 0) (call $read (i64.const 0x100000000) (i64.const 4096)))
      (i64.const 0) (i64.const 0)))
    (i32.const 0)))
