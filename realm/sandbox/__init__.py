"""The sandbox: tenants' guests (WebAssembly modules) run under Wasmtime and reach the host
only through the Realm ABI (docs/ABI.md).

    runtime.py   the engine, the ABI linkers, the compiled-module cache, `Runtime`, `Limits`
    instance.py  one guest instance in its own store: `GuestInstance.generate(request)`
    abi.py       the host functions, from one table
    state.py     what the host keeps for a running guest (models, sessions, clocks)
    memory.py    bounds-checked access to guest memory
    request.py   the request a guest reads
    toolchain.py building guests with zig (`realm guest build`)

Nothing is imported here, so `realm guest build` does not load PyTorch.
"""
