;; A guest that imports realm_log with the wrong type: refused at load.
(module
  (import "env" "realm_log" (func $log (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (i32.const 0x10000))
  (func (export "generate") (result i32) (i32.const 0)))
