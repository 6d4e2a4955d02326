;; Hands the host GGUF bytes from its own memory: the test puts their address at 0 and
;; their size at 4. realm_model_info goes to 64; the id is emitted as a token.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_store_model" (func $store (param i32 i32 i32) (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $id i32)
    (local.set $id (call $store (i32.load (i32.const 0)) (i32.load (i32.const 4)) (i32.const 64)))
    (if (i32.lt_s (local.get $id) (i32.const 0)) (then (return (local.get $id))))
    (drop (call $emit (local.get $id) (i32.const 0) (i32.const 0)))
    (i32.const 0)))
