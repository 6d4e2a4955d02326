"""The sandbox: tenants' guests (WebAssembly modules) run under Wasmtime and reach the host
only through the Realm ABI (docs/ABI.md).

    runtime.py          `Runtime`: what guests reach (models, backends, steps); loads modules, makes instances
    instance.py         one guest instance in its own store: `GuestInstance.generate(request)`
    limits.py           `Limits`: what one instance may use
    guest_module.py     compiling, checking (the ABI's import rules) and caching guest modules
    wasm_engine.py      the process's Wasmtime engine, its epoch ticker, the ABI linkers
    abi.py              the ABI version and the one table of host functions
    host_io.py          host functions: backend type, log, request, emit, finish
    host_models.py      host functions: model identity, tokenizer, vocabulary, chat template
    host_compute.py     host functions: forward steps, per-layer steps, matmuls, tensors
    host_args.py        argument checks shared by host functions
    state.py            what the host keeps for a running guest (models, sessions, clocks)
    cpu_share.py        a tenant's share of the CPU: its guests are demoted beyond it
    memory.py           bounds-checked access to guest memory
    wasmtime_bridge.py  the only module that touches wasmtime-py's internals
    request.py          the request a guest reads
    toolchain.py        building guests with zig (`realm guest build`)

Nothing is imported here, so `realm guest build` does not load PyTorch.
"""
