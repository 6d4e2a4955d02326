;; Hostile guest: grows its memory a page at a time up to its cap (memory.grow answers
;; -1 there), writing every page as it goes, then rewrites all of it forever: page faults
;; first, then a core and the memory bandwidth, until its time limit stops it.
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $addr i32)
    (loop $grow
      (if (i32.ne (memory.grow (i32.const 1)) (i32.const -1))
        (then
          (i32.store (i32.mul (i32.sub (memory.size) (i32.const 1)) (i32.const 65536)) (memory.size))
          (br $grow))))
    (loop $forever
      (local.set $addr (i32.const 0))
      (loop $sweep
        (i32.store (local.get $addr) (i32.add (i32.load (local.get $addr)) (i32.const 1)))
        (local.set $addr (i32.add (local.get $addr) (i32.const 64)))
        (br_if $sweep (i32.lt_u (local.get $addr) (i32.mul (memory.size) (i32.const 65536)))))
      (br $forever))
    (i32.const 0)))
