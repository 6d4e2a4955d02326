;; Hostile guest: unbounded recursion.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func $deeper (param i32) (result i32)
    (i32.add (call $deeper (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "generate") (result i32)
    (call $deeper (i32.const 0))))
