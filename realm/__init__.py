"""Realm: a multi-tenant LLM inference runtime.

Tenants' orchestration logic runs in WebAssembly sandboxes; model weights and heavy
compute live in the host, loaded once and shared by every tenant.
"""
