"""What the server runs on: the served models (one copy each, in one model store), one
batch scheduler per model shared by every tenant, the sandbox runtime, and the tenants.

A request runs in a fresh instance of its tenant's guest (its own Wasmtime store: nothing
of one request, let alone one tenant, is visible to another) on a thread of its own; the
guest's `realm_forward` steps go through `SchedulerRouter` to the scheduler of the model
the session belongs to, which batches them with every other waiting step. Output comes
back to the event loop through an asyncio queue, one event per `realm_emit`.

The request policy lives here too, not in the routes: which tenant a key is, which served
model a request names (by name, or by content as `sha256:<hex>`), the prompt's tokens,
max_tokens and the context's room (`Host.plan`), and admission (`Host.start`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from realm.engine.logprobs import TokenLogprobs
from realm.engine.model_store import StoredModel
from realm.engine.scheduler import BatchScheduler
from realm.engine.step_router import SchedulerRouter
from realm.errors import (
    AbiVersionMismatch,
    ContextOverflow,
    GuestFault,
    InternalError,
    InvalidArgument,
    RealmError,
    ServiceUnavailable,
    Unauthorized,
    UnknownModel,
)
from realm.models import catalogue
from realm.models import prompt as prompt_rule
from realm.models.tokenizer import Tokenizer
from realm.sandbox.instance import GuestResult
from realm.sandbox.request import build_request
from realm.sandbox.runtime import ModuleCache, Runtime
from realm.server.keys import KeyRing
from realm.server.metrics import Metrics
from realm.server.schemas import ChatRequest, CompletionRequest, invalid
from realm.server.settings import ALL_KEYS, ServerSettings
from realm.server.tenants import Admission, Tenant

log = logging.getLogger("realm.server")

SHA256_MODEL = re.compile(r"sha256:([0-9a-f]{64})", re.IGNORECASE)
"""A request's `model` that names a served model by the SHA-256 of its content."""

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions (chat: the tenant's max_tokens)


@dataclass(frozen=True)
class Served:
    """A served model as one request named it."""

    name: str  # the name it is served under
    entry: StoredModel
    pinned_sha256: str | None = None  # the hash the client named it by (`sha256:<hex>`), lower case


@dataclass
class Job:
    """What one generation request runs: the guest's request and the tokens it may use."""

    model: Served
    chat: bool
    request: dict[str, Any]  # what the guest reads (docs/ABI.md, "The request"), of choice 0
    prompt_tokens: int
    max_tokens: int
    n: int = 1  # choices: choice i runs the request with seed + i
    logprobs: bool = False

    def choice_request(self, index: int) -> dict[str, Any]:
        """The guest's request for choice `index`: its own seed, so that a seeded request
        gives the same n choices every time."""
        return {**self.request, "seed": (self.request["seed"] + index) % 2**64}


# ---------------------------------------------------------------------------- events


@dataclass
class Emitted:
    token: int  # -1: text with no new token
    text: str
    logprobs: TokenLogprobs | None = None  # of `token`, if the request asked for them
    index: int = 0  # the choice


@dataclass
class Finished:
    result: GuestResult
    index: int = 0


@dataclass
class Failed:
    error: BaseException
    index: int = 0


Event = Emitted | Finished | Failed


class Host:
    def __init__(self, settings: ServerSettings, metrics: Metrics, *, progress: bool | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.router = SchedulerRouter()
        self.models: dict[str, StoredModel] = {}  # served name -> stored model
        self.loaded_at: dict[str, int] = {}  # served name -> when it was loaded (unix time)
        self.tenants: dict[str, Tenant] = {}
        self.keys = KeyRing({})
        self.metrics_keys = KeyRing({h: "metrics" for h in settings.metrics_keys or () if h != ALL_KEYS})
        self.longest_token: dict[str, int] = {}  # served name -> characters of its vocabulary's longest token
        self.open_tenant: Tenant | None = None
        self.runtime: Runtime | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------------- loading

    def load(self) -> None:
        """Load every served model (fetching catalogue models if needed), start a scheduler
        per model, load every tenant's guest module. Sets `ready`; any failure is kept in
        `load_error` and raised."""
        try:
            self._load()
        except BaseException as e:
            self.load_error = e
            raise
        self.ready.set()

    def _load(self) -> None:
        s = self.settings
        torch.set_num_threads(s.compute_threads())
        self.runtime = Runtime.on_host(
            None if s.backend in (None, "auto") else s.backend, steps=self.router, modules=ModuleCache()
        )
        store = self.runtime.models
        for m in s.model_entries():
            started = time.perf_counter()
            where = s.resolve_path(m.path) if m.path is not None else m.name
            entry = store.store_source(catalogue.locate(where, name=m.name, progress=self.progress))
            self.models[m.name] = entry
            self.loaded_at[m.name] = int(time.time())
            scheduler = BatchScheduler(
                entry.model.transformer,
                s.max_batch_tokens,
                self.metrics.observer(m.name),
                gather_s=s.batch_wait_ms / 1000,
            )
            self.router.add(scheduler)
            self.metrics.serve(m.name, scheduler, entry.model.kv_pool)
            self.longest_token[m.name] = longest_token(entry.model.tokenizer)
            log.info(
                "model %s loaded in %.1f s (sha256 %s, %s)",
                m.name,
                time.perf_counter() - started,
                entry.sha256[:16],
                entry.model.backend.name,
            )
        served = list(self.models.items())
        modules: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        for t in s.effective_tenants():
            if t.guest not in modules:
                modules[t.guest] = (
                    self.runtime.default_module()
                    if t.guest == "default"
                    else self.runtime.load_module(s.resolve_path(t.guest))
                )
            tenant = Tenant.build(t, modules[t.guest], served)
            self.tenants[t.name] = tenant
            hashes.update({k: t.name for k in t.keys})
            if t.open:
                self.open_tenant = tenant
            self.runtime.instance(tenant.module, t.name, allowed=tenant.allowed, limits=tenant.limits).close()
        self.keys = KeyRing(hashes)
        log.info("serving %s to tenants %s", ", ".join(self.models), ", ".join(self.tenants))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.router.close()

    # ------------------------------------------------------------------------- lookups

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise ServiceUnavailable(f"the server failed to start: {self.load_error}")
        if not self.ready.is_set():
            raise ServiceUnavailable("the server is loading its models; retry shortly")

    def tenant_for_key(self, key: str | None) -> Tenant:
        """The tenant of an API key. No key, or any key on a server that has none, is the
        open tenant's (the `openai` client always sends one); else Unauthorized (401)."""
        name = self.keys.tenant_of(key) if key else None
        if name is not None:
            return self.tenants[name]
        if self.open_tenant is not None and (key is None or len(self.keys) == 0):
            return self.open_tenant
        raise Unauthorized("no API key given" if key is None else "invalid API key")

    def check_metrics_key(self, key: str | None) -> None:
        """Unauthorized (401) unless `metrics_keys` lets `key` (None: no key) read /metrics."""
        allowed = self.settings.metrics_keys
        if allowed is None:
            return
        if key is None:
            raise Unauthorized("/metrics needs an API key on this server: send `Authorization: Bearer KEY`")
        if self.metrics_keys.tenant_of(key) is None and not (ALL_KEYS in allowed and self.keys.tenant_of(key)):
            raise Unauthorized("this key may not read /metrics")

    def model_name(self, tenant: Tenant, asked: str | None) -> str:
        """The model a request names, or the tenant's default if it names none."""
        return asked or self.default_model(tenant)

    def resolve(self, tenant: Tenant, name: str) -> Served:
        """The served model `name` (a served name, or `sha256:<hex>` of its content) if
        `tenant` may use it: UnknownModel (404) if no such model is served,
        PermissionDenied (403) if the tenant may not use it."""
        pinned = SHA256_MODEL.fullmatch(name)
        if pinned is None:
            entry = self.models.get(name)
            if entry is None:
                raise UnknownModel(f"the model {name!r} does not exist on this server")
            tenant.check_model(name, entry)
            return Served(name, entry)
        sha = pinned.group(1).lower()
        names = [n for n, e in self.models.items() if e.sha256 == sha]
        if not names:
            raise UnknownModel(f"no model with SHA-256 {sha} is served here ({name!r})")
        entry = self.models[names[0]]
        tenant.check_model(name, entry)
        return Served(next((n for n in names if tenant.allowed(n)), names[0]), entry, sha)

    def default_model(self, tenant: Tenant) -> str:
        for name, entry in self.models.items():
            if tenant.allowed(name) or tenant.allowed(entry.sha256):
                return name
        raise UnknownModel(f"tenant {tenant.name} may use no model on this server")

    def prompt_tokens(self, served: Served, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """The prompt's tokens as the default guest makes them: the chat template's rendering
        of `messages`, or `prompt`; BOS by the model's rule, special tokens parsed. A text
        too long for the context is refused before it is tokenized (ContextOverflow)."""
        model = served.entry.model
        if messages is None:
            text = prompt or ""
        elif model.chat_template is not None:
            text = model.chat_template.render(messages)
        else:
            return model.prompt_tokens(messages=messages)  # raises: says why the model cannot chat
        fewest = -(-len(text) // self.longest_token[served.name])
        if fewest >= model.config.context_length:
            raise ContextOverflow(
                f"the prompt has {len(text)} characters, at least {fewest} tokens; model {model.name}'s "
                f"context holds {model.config.context_length} (and at least one token must be generated)"
            )
        return prompt_rule.encode(model.tokenizer, text)

    def check_context(self, entry: StoredModel, n_prompt: int) -> None:
        ctx = entry.model.config.context_length
        if n_prompt == 0:
            raise InvalidArgument("the prompt is empty")
        if n_prompt >= ctx:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens; model {entry.model.name}'s context holds {ctx} "
                "(and at least one token must be generated)"
            )

    # ------------------------------------------------------------------------- policy

    def plan(self, tenant: Tenant, name: str, body: CompletionRequest | ChatRequest) -> Job:
        """What to run for a validated request body for model `name`: the guest's request,
        with the prompt's tokens and max_tokens (the caller's, else 16 for completions and
        the tenant's limit for chat; never past the context). Raises what the request
        breaks: 404/403 for the model, 400 for the prompt or max_tokens. Blocks (tokenizes)."""
        served = self.resolve(tenant, name)
        entry = served.entry
        if isinstance(body, ChatRequest):
            prompt, messages = None, body.message_dicts()
            asked, default = body.requested_max_tokens(), tenant.settings.limits.max_tokens
        else:
            prompt, messages = body.prompt_text(), None
            asked, default = body.max_tokens, COMPLETION_MAX_TOKENS
        tenant.check_n(body.n)
        params, stops = body.sampling(), body.stops()
        vocab = entry.model.config.vocab_size
        outside = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if outside is not None:
            raise invalid(f"logit_bias: token {outside} is outside the vocabulary (size {vocab})", "logit_bias")
        prompt_ids = self.prompt_tokens(served, prompt, messages)
        n_prompt = len(prompt_ids)
        self.check_context(entry, n_prompt)
        if asked is not None:
            tenant.check_max_tokens(asked)
        room = entry.model.config.context_length - n_prompt
        max_tokens = min(asked if asked is not None else default, room)
        request = build_request(
            entry,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            params=params,
            stop=stops,
            name=served.name,
            prompt_tokens=prompt_ids,
            top_logprobs=body.top_logprobs_asked(),
        )
        if served.pinned_sha256 is not None:  # the guest's realm_validate_model_id checks what the client pinned
            request["model_sha256"] = served.pinned_sha256
        return Job(served, messages is not None, request, n_prompt, max_tokens, body.n, request["logprobs"])

    # ------------------------------------------------------------------------- running

    def start(self, tenant: Tenant, job: Job, cancel: threading.Event) -> AsyncIterator[Event]:
        """Admit `job`'s n choices, all or none (LimitExceeded, 429, if the tenant is at its
        concurrency limit or out of tokens for this minute), and start each in a fresh
        instance of the tenant's guest, on a thread of its own, now; the iterator yields one
        Emitted per realm_emit, then Finished or Failed, for each choice (events carry the
        choice's index), and ends when every choice has finished or one has failed.

        Setting `cancel` (the iterator does it when it is closed, e.g. on client disconnect)
        makes the guests' next realm_emit or realm_forward return REALM_E_CANCELLED. An
        admission is released when its guest has really stopped, and its sessions (KV
        caches) are freed then. The tenant is charged, per choice, the prompt's tokens plus
        the tokens the guest emitted (what the host saw, not what the guest reports). Call
        from the event loop's thread."""
        admissions = tenant.admit_all(job.n, job.prompt_tokens + job.max_tokens)
        runtime = self.runtime
        if runtime is None:
            for admission in admissions:
                admission.release(0)
            raise ServiceUnavailable("the server is not ready")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        active = self.metrics.active.labels(tenant.name)

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work(index: int, admission: Admission) -> None:
            emitted = [0]
            reported: list[TokenLogprobs | None] = [None]  # realm_logprobs' report of the next token

            def on_logprobs(logprobs: TokenLogprobs) -> None:
                reported[0] = logprobs

            def on_token(token: int, text: str) -> None:
                if token >= 0:
                    emitted[0] += 1
                    if emitted[0] > job.max_tokens:
                        raise GuestFault(
                            f"guest {tenant.module.name} emitted more than max_tokens ({job.max_tokens}) tokens"
                        )
                logprobs, reported[0] = reported[0], None
                put(Emitted(token, text, logprobs, index))  # RuntimeError once the loop is gone: the guest is stopped

            try:
                with runtime.instance(
                    tenant.module, tenant.name, allowed=tenant.allowed, limits=tenant.limits
                ) as guest:
                    request = job.choice_request(index)
                    result = guest.generate(request, on_token=on_token, cancel=cancel, on_logprobs=on_logprobs)
                event: Event = Finished(result, index)
            except BaseException as e:  # every failure goes to the caller; the thread ends
                if not isinstance(e, RealmError):
                    log.exception("[%s] request failed in the host", tenant.name)
                event = Failed(e, index)
            finally:
                admission.release(job.prompt_tokens + emitted[0])
                active.dec()
            try:
                put(event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        for index, admission in enumerate(admissions):
            active.inc()
            try:
                threading.Thread(
                    target=work, args=(index, admission), name=f"realm-guest-{tenant.name}", daemon=True
                ).start()
            except BaseException:
                cancel.set()  # the choices already started stop
                active.dec()
                for unstarted in admissions[index:]:
                    unstarted.release(0)
                raise
        return _events(queue, cancel, job.n)


async def _events(queue: asyncio.Queue[Event], cancel: threading.Event, n: int) -> AsyncIterator[Event]:
    """The events of n choices, until all have finished or one has failed."""
    running = n
    try:
        while running:
            event = await queue.get()
            yield event
            if isinstance(event, Failed):
                return
            if isinstance(event, Finished):
                running -= 1
    finally:
        cancel.set()  # a no-op once the guests have finished; stops them if the consumer left


def longest_token(tokenizer: Tokenizer) -> int:
    """Characters of the vocabulary's longest token text: no token covers more characters of
    a prompt (byte-level BPE writes one character a byte; SentencePiece writes a space as one
    `▁`), so a text of n characters has at least n / this many tokens."""
    return max(1, max(len(tokenizer.token_text(i)) for i in range(tokenizer.vocab_size)))


def describe_failure(error: BaseException) -> RealmError:
    """The RealmError to report for a request's failure (a non-Realm exception is a fault
    of the server: InternalError, details in the log)."""
    if isinstance(error, RealmError):
        return error
    return InternalError(f"internal error ({type(error).__name__}); details are in the server's log")


def is_guest_trap(error: BaseException) -> bool:
    return isinstance(error, (GuestFault, AbiVersionMismatch))
