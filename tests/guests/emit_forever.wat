;; Emits "x" as token 1, 2, 3, ... forever. With $obey set (request byte 0 is '1') it
;; returns the code when realm_emit says REALM_E_CANCELLED; otherwise it ignores it.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i32 i32) (result i32)))
  (import "env" "realm_request_read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x")
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $i i32) (local $rc i32) (local $obey i32)
    (drop (call $read (i32.const 32) (i32.const 64)))
    (local.set $obey (i32.eq (i32.load8_u (i32.const 32)) (i32.const 49)))
    (loop $forever
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (local.set $rc (call $emit (local.get $i) (i32.const 16) (i32.const 1)))
      (if (i32.and (local.get $obey) (i32.lt_s (local.get $rc) (i32.const 0)))
        (then (return (local.get $rc))))
      (br $forever))
    (i32.const 0)))
