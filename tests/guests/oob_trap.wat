;; Hostile guest: reads outside its own linear memory (a trap inside WebAssembly).
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (i32.load (i32.const 0xFFFFFFF0))))
