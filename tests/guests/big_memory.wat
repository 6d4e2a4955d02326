;; Hostile guest: its initial memory (100 pages, 6.25 MiB) is more than a small cap allows.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 100)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32) (i32.const 0)))
