;; Hostile guest: loops forever, but spends nearly all its time inside a cheap host call,
;; so its WebAssembly time grows slowly: the wall-clock limit has to stop it.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_get_backend_type" (func $backend (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (loop $forever
      (drop (call $backend))
      (br $forever))
    (i32.const 0)))
