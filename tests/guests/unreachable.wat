;; Hostile guest: traps at once (what a C guest's abort() or __builtin_trap() does).
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    unreachable))
