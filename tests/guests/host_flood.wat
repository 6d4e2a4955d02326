;; Hostile guest: calls the cheapest host function (realm_abi_version) in a loop forever.
;; Each call runs host (Python) code, so the flood takes the host's GIL rather than a core;
;; its WebAssembly time grows slowly, so the wall-clock limit stops it.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (loop $forever
      (drop (call $abi))
      (br $forever))
    (i32.const 0)))
