;; Hostile guest: hands host functions pointers and lengths outside its memory (one 64 KiB
;; page). Every call must fail with REALM_E_OUT_OF_BOUNDS (-2) without touching anything;
;; the guest reports each result as an emitted "token" 0 - code (so 2 each) and returns 0.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_request_read" (func $read (param i32 i32) (result i32)))
  (import "env" "realm_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i32 i32) (result i32)))
  (import "env" "realm_validate_model_id" (func $validate (param i32 i32) (result i32)))
  (import "env" "realm_store_model_by_name" (func $by_name (param i32 i32 i32) (result i32)))
  (import "env" "realm_matmul_cpu" (func $matmul (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func $report (param $rc i32)
    (drop (call $emit (i32.sub (i32.const 0) (local.get $rc)) (i32.const 0) (i32.const 0))))
  (func (export "generate") (result i32)
    ;; the request written past the end of memory
    (call $report (call $read (i32.const 65530) (i32.const 4096)))
    ;; an address above 2 GiB (negative as a signed i32)
    (call $report (call $read (i32.const 0xFFFFFF00) (i32.const 4096)))
    ;; pointer + length wrapping around 2^32
    (call $report (call $log (i32.const 1) (i32.const 0xFFFFFFFF) (i32.const 2)))
    ;; text partly outside memory
    (call $report (call $emit (i32.const 7) (i32.const 65500) (i32.const 100)))
    ;; the 32 hash bytes outside memory
    (call $report (call $validate (i32.const 1) (i32.const 65530)))
    ;; the info struct outside memory (checked before the model is looked up)
    (call $report (call $by_name (i32.const 0) (i32.const 4) (i32.const 65500)))
    ;; a matmul whose output would run past the end of memory
    (call $report (call $matmul (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 64) (i32.const 64) (i32.const 60000)))
    (i32.const 0)))
