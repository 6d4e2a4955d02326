"""Host functions for a guest's input and output: the backend type, logging, the request,
emitted tokens and the finish report (docs/ABI.md, "Version, backend, log" and "Request
and output")."""

from __future__ import annotations

import logging

from realm.errors import InvalidArgument, LimitExceeded
from realm.sandbox.host_args import check_cancel, guest_memory, non_negative, write_sized
from realm.sandbox.state import GuestState
from realm.sandbox.wasmtime_bridge import StoreContext

log = logging.getLogger("realm.guest")

FINISH_REASONS = {0: "stop", 1: "length"}
LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
MAX_LOG = 4096  # bytes of one log message kept
MAX_EMIT = 1024 * 1024  # bytes of text one realm_emit may pass


def get_backend_type(st: GuestState, caller: StoreContext) -> int:
    return int(st.host.backends.active.kind)


def log_message(st: GuestState, caller: StoreContext, level: int, ptr: int, length: int) -> int:
    mem = guest_memory(st, caller)
    mem.address(ptr, length, "log message")  # the whole message must be guest memory
    text = mem.read(ptr, min(length, MAX_LOG), "log message").decode("utf-8", "replace")
    if level == 3:
        st.last_error = text
    call = st.call
    if call is not None:
        call.logs += 1
        if call.logs > st.limits.max_log_messages:
            return 0  # quietly dropped: a chatty guest must not flood the host's log
    log.log(LOG_LEVELS.get(level, logging.INFO), "[%s/%s] %s", st.tenant, st.name, text)
    return 0


def request_read(st: GuestState, caller: StoreContext, buf: int, cap: int) -> int:
    if st.call is None:
        raise InvalidArgument("there is no request outside of generate")
    return write_sized(guest_memory(st, caller), buf, cap, st.call.payload, "request")


def emit(st: GuestState, caller: StoreContext, token: int, ptr: int, length: int) -> int:
    call = st.call
    if call is None:
        raise InvalidArgument("realm_emit outside of generate")
    check_cancel(st)
    if length > MAX_EMIT:
        raise LimitExceeded(f"one emit of {length} bytes exceeds the limit of {MAX_EMIT}")
    text = guest_memory(st, caller).read(ptr, length, "emitted text").decode("utf-8", "replace")
    reported, call.pending_logprobs = call.pending_logprobs, None
    if reported is not None and reported.token != token:
        raise InvalidArgument(f"realm_logprobs reported token {reported.token}, but token {token} was emitted")
    if token >= 0:
        call.tokens.append(token)
    if reported is not None:
        call.logprobs.append(reported)
        if call.on_logprobs is not None:
            call.on_logprobs(reported)
    if text:
        call.text.append(text)
    if call.on_token is not None:
        call.on_token(token, text)
    return 0


def finish(st: GuestState, caller: StoreContext, reason: int, prompt_tokens: int, completion_tokens: int) -> int:
    if st.call is None:
        raise InvalidArgument("realm_finish outside of generate")
    if reason not in FINISH_REASONS:
        raise InvalidArgument(f"unknown finish reason {reason} (0 stop, 1 length)")
    non_negative(prompt_tokens, "prompt_tokens")
    non_negative(completion_tokens, "completion_tokens")
    st.call.finish = (reason, prompt_tokens, completion_tokens)
    return 0
