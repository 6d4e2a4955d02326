;; Hostile guest: asks the host for a 256x256 @ 256x256 float32 matmul (realm_matmul_cpu) in a
;; loop forever. Each call is the guest's own arithmetic, charged to its tenant's CPU share
;; and run on its own thread with one core; the wall-clock limit stops it.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_matmul_cpu" (func $matmul (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 12)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (loop $forever
      (drop (call $matmul (i32.const 0) (i32.const 262144) (i32.const 256) (i32.const 256) (i32.const 256) (i32.const 524288)))
      (br $forever))
    (i32.const 0)))
