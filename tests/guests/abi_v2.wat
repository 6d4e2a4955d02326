;; A guest built for ABI 2.0: the host must refuse it, naming both versions.
(module
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (i32.const 0x20000))
  (func (export "generate") (result i32) (i32.const 0)))
