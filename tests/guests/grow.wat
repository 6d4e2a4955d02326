;; Hostile guest: asks for more memory than its cap. memory.grow answers -1 (as the
;; spec says), the guest reports that as token 99 (-1 + 100), then aborts like a C program
;; whose malloc failed.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $r i32)
    (local.set $r (memory.grow (i32.const 4096)))
    (drop (call $emit (i32.add (local.get $r) (i32.const 100)) (i32.const 0) (i32.const 0)))
    (if (i32.eq (local.get $r) (i32.const -1)) (then unreachable))
    (i32.const 0)))
