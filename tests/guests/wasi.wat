;; A guest that imports WASI: not part of the Realm ABI, refused at load.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (i32.const 0x10000))
  (func (export "generate") (result i32) (i32.const 0)))
