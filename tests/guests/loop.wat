;; Hostile guest: generate never returns (a tight loop that makes no host call).
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
