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
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from realm.engine.logprobs import TokenLogprobs
from realm.engine.model_store import StoredModel
from realm.engine.step_router import SchedulerRouter
from realm.errors import (
    AbiVersionMismatch,
    Cancelled,
    ContextOverflow,
    GuestFault,
    InternalError,
    InvalidArgument,
    RealmError,
    ServiceUnavailable,
    Unauthorized,
    UnknownModel,
)
from realm.models import prompt as prompt_rule
from realm.sandbox.instance import GuestResult
from realm.sandbox.request import build_request
from realm.sandbox.runtime import ModuleCache, Runtime
from realm.server.keys import KeyRing
from realm.server.metrics import Metrics
from realm.server.model_slots import SHA256_MODEL, ModelSlots, unloaded_card
from realm.server.openai_format import model_card
from realm.server.schemas import ChatRequest, CompletionRequest, invalid
from realm.server.settings import ALL_KEYS, ServerSettings, TenantSettings
from realm.server.tenants import Admission, Tenant
from realm.server.tools import ToolMode, with_tools

log = logging.getLogger("realm.server")

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
    tools: ToolMode | None = None  # the reply's text is read back into tool calls
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
        self.slots = ModelSlots(settings, metrics, self.router, progress=self.progress)
        self.tenants: dict[str, Tenant] = {}
        self.keys = KeyRing({})
        self.metrics_keys_allowed = settings.metrics_keys
        self.metrics_keys = _metrics_ring(settings)
        self.open_tenant: Tenant | None = None
        self.runtime: Runtime | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.draining = False  # shutting down: new requests get 503, running ones finish
        self._stopping = False  # shutting down, past the grace period: running ones are stopped
        self._running = _RunningGuests()
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
        self.slots.store = self.runtime.models
        self.slots.describe()
        for name in s.preloaded():
            self.slots.load(name)
        served = [(name, slot.sha256) for name, slot in self.slots.slots.items()]
        modules: dict[str, Any] = {}
        for t in s.effective_tenants():
            if t.guest not in modules:
                modules[t.guest] = (
                    self.runtime.default_module()
                    if t.guest == "default"
                    else self.runtime.load_module(s.resolve_path(t.guest))
                )
            tenant = Tenant.build(t, modules[t.guest], served)
            self.tenants[t.name] = tenant
            if t.open:
                self.open_tenant = tenant
            self.runtime.instance(tenant.module, t.name, allowed=tenant.allowed, limits=tenant.limits).close()
        self.keys = _tenant_ring(s.effective_tenants())
        log.info(
            "serving %s (loaded: %s) to tenants %s",
            ", ".join(self.slots.slots),
            ", ".join(self.models) or "none yet",
            ", ".join(self.tenants),
        )

    @property
    def models(self) -> dict[str, StoredModel]:
        """The served models loaded now, by served name (a snapshot: safe to iterate)."""
        return self.slots.loaded

    @property
    def loaded_at(self) -> dict[str, int]:
        return self.slots.loaded_at

    def reload_keys(self, settings: ServerSettings) -> list[str]:
        """Take the API keys, the tenants' and /metrics', from `settings` (a fresh read of the
        config): a key removed there is refused from the next request on, one added is
        accepted. Only keys change: what else differs (a tenant added or removed, a limit,
        a model) needs a restart, and is returned as warnings."""
        old = {t.name: t for t in self.settings.effective_tenants()}
        new = {t.name: t for t in settings.effective_tenants()}
        warnings = [f"tenant {name} is new: it is served after a restart" for name in new.keys() - old.keys()]
        warnings += [f"tenant {name} was removed: its keys are refused now" for name in old.keys() - new.keys()]
        warnings += [
            f"tenant {name}: changes other than its keys need a restart"
            for name in new.keys() & old.keys()
            if new[name].model_copy(update={"keys": []}) != old[name].model_copy(update={"keys": []})
        ]
        unchanged = {"tenants", "metrics_keys"}
        if settings.model_dump(exclude=unchanged) != self.settings.model_dump(exclude=unchanged):
            warnings.append("server settings other than keys changed: they need a restart")
        self.keys = _tenant_ring([t for t in settings.effective_tenants() if t.name in self.tenants])
        self.metrics_keys_allowed = settings.metrics_keys
        self.metrics_keys = _metrics_ring(settings)
        return warnings

    # ------------------------------------------------------------------------- shutting down

    def drain(self) -> None:
        """Refuse new requests (503, /health too, so a load balancer stops sending) and let
        the running ones finish."""
        self.draining = True

    def running(self) -> int:
        """Requests whose guests are still running."""
        return self._running.count()

    def stop_running(self) -> None:
        """Stop every running guest at its next host call; their clients get a 503 error."""
        self._stopping = True
        self._running.cancel_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.router.close()

    # ------------------------------------------------------------------------- lookups

    def check_ready(self) -> None:
        if self.draining:
            raise ServiceUnavailable("the server is shutting down; retry on another replica or after its restart")
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
        allowed = self.metrics_keys_allowed
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
        served, pinned = self._served_name(tenant, name)  # before loading: no tenant loads what it may not use
        return Served(served, self.slots.get(served), pinned)

    def _served_name(self, tenant: Tenant, name: str) -> tuple[str, str | None]:
        """The served name `name` stands for (a served name, or `sha256:<hex>` of its
        content) and the hash the client pinned, if `tenant` may use it (404/403 as resolve)."""
        names = self.slots.names_for(name)
        pinned = SHA256_MODEL.fullmatch(name)
        sha = pinned.group(1).lower() if pinned else None
        if not names:
            if sha is None:
                raise UnknownModel(f"the model {name!r} does not exist on this server")
            raise UnknownModel(f"no model with SHA-256 {sha} is served here ({name!r})")
        tenant.check_allowed(name, self.slots.slots[names[0]].sha256)
        return next((n for n in names if tenant.allowed(n)), names[0]), sha

    def default_model(self, tenant: Tenant) -> str:
        for name, slot in self.slots.slots.items():
            if tenant.allowed(name) or tenant.allowed(slot.sha256):
                return name
        raise UnknownModel(f"tenant {tenant.name} may use no model on this server")

    def model_cards(self, tenant: Tenant) -> list[dict[str, Any]]:
        """/v1/models: every served model `tenant` may use, loaded or not (`info.loaded`)."""
        return [self._card(name) for name, slot in self.slots.slots.items() if tenant.allowed(name)]

    def model_card(self, tenant: Tenant, name: str) -> dict[str, Any]:
        """/v1/models/{name}: a served model (by name or `sha256:<hex>`) `tenant` may use,
        without loading it."""
        return self._card(self._served_name(tenant, name)[0])

    def _card(self, name: str) -> dict[str, Any]:
        entry = self.models.get(name)
        if entry is None:
            return unloaded_card(name, self.slots.slots[name].sha256)
        card = model_card(name, entry, self.loaded_at.get(name, 0))
        return card | {"info": card["info"] | {"loaded": True}}

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
        self.check_text_fits(served, text, "prompt")
        return prompt_rule.encode(model.tokenizer, text)

    def check_text_fits(self, served: Served, text: str, what: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit the model's context: it has at
        least one token per `Tokenizer.longest_text` characters (byte-level BPE writes one
        character a byte; SentencePiece writes a space as one `▁`), so no CPU goes to a text
        that must fail."""
        model = served.entry.model
        fewest = -(-len(text) // max(1, model.tokenizer.longest_text))
        if fewest >= model.config.context_length:
            raise ContextOverflow(
                f"the {what} has {len(text)} characters, at least {fewest} tokens; model {model.name}'s "
                f"context holds {model.config.context_length} (and at least one token must be generated)"
            )

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
        tools = None
        if isinstance(body, ChatRequest):
            prompt, messages = None, body.message_dicts()
            asked, default = body.requested_max_tokens(), tenant.settings.limits.max_tokens
            tools = body.tool_mode()
            if tools is not None:
                messages = with_tools(messages, tools)
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
        constraint = body.constraint() if tools is None else tools.constraint()
        if constraint is not None:
            self.check_constraint(tenant, entry, constraint, body.constraint_field() or "tools")
        request = build_request(
            entry,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            params=params,
            stop=stops,
            name=served.name,
            prompt_tokens=prompt_ids,
            constraint=constraint,
            top_logprobs=body.top_logprobs_asked(),
        )
        if served.pinned_sha256 is not None:  # the guest's realm_validate_model_id checks what the client pinned
            request["model_sha256"] = served.pinned_sha256
        return Job(served, messages is not None, request, n_prompt, max_tokens, tools, body.n, request["logprobs"])

    def check_constraint(
        self, tenant: Tenant, entry: StoredModel, constraint: dict[str, Any], field: str | None
    ) -> None:
        """Compiles the request's constraint now, on this request's own thread (never the
        model runner's): a bad one is a 400 before admission, and a good one is in the
        tenant's grammar cache when its guest asks for it."""
        if self.runtime is None:
            raise ServiceUnavailable("the server is not ready")
        model = entry.model
        try:
            self.runtime.grammars.compile(tenant.name, model.tokenizer, model.config.vocab_size, constraint)
        except InvalidArgument as e:
            e.param = e.param or field
            raise

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
        try:
            if self.runtime is None:
                raise ServiceUnavailable("the server is not ready")
            self.slots.hold(job.model.name, job.model.entry)
        except BaseException:
            for admission in admissions:
                admission.release(0)
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        model = job.model.name
        active = self.metrics.active.labels(tenant.name)
        choices = _Choices(self._running, lambda: self.slots.release(model), cancel, job.n, active)

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        for index, admission in enumerate(admissions):
            choices.started()
            try:
                threading.Thread(
                    target=self._run_choice,
                    args=(tenant, job, index, admission, choices, put),
                    name=f"realm-guest-{tenant.name}",
                    daemon=True,
                ).start()
            except BaseException:
                cancel.set()  # the choices already started stop
                choices.stopped()
                for unstarted in admissions[index:]:
                    unstarted.release(0)
                for _ in admissions[index + 1 :]:
                    choices.never_started()
                raise
        return _events(queue, cancel, job.n)

    def _run_choice(
        self,
        tenant: Tenant,
        job: Job,
        index: int,
        admission: Admission,
        choices: _Choices,
        put: Callable[[Event], None],
    ) -> None:
        """Choice `index` of `job`, in a fresh instance of the tenant's guest, on this thread."""
        emitted = [0]
        reported: list[TokenLogprobs | None] = [None]  # realm_logprobs' report of the next token

        def on_logprobs(logprobs: TokenLogprobs) -> None:
            reported[0] = logprobs

        def on_token(token: int, text: str) -> None:
            if token >= 0:
                emitted[0] += 1
                if emitted[0] > job.max_tokens:
                    module, most = tenant.module.name, job.max_tokens
                    raise GuestFault(f"guest {module} emitted more than max_tokens ({most}) tokens")
            logprobs, reported[0] = reported[0], None
            put(Emitted(token, text, logprobs, index))  # RuntimeError once the loop is gone: the guest is stopped

        runtime = self.runtime
        assert runtime is not None  # start() checked
        try:
            with runtime.instance(tenant.module, tenant.name, allowed=tenant.allowed, limits=tenant.limits) as guest:
                request = job.choice_request(index)
                result = guest.generate(request, on_token=on_token, cancel=choices.cancel, on_logprobs=on_logprobs)
            event: Event = Finished(result, index)
        except BaseException as e:  # every failure goes to the caller; the thread ends
            if not isinstance(e, RealmError):
                log.exception("[%s] request failed in the host", tenant.name)
            if isinstance(e, Cancelled) and self._stopping:
                e = ServiceUnavailable("the server shut down before this request finished")
            event = Failed(e, index)
        finally:
            admission.release(job.prompt_tokens + emitted[0])
            choices.stopped()
        try:
            put(event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass


class _RunningGuests:
    """The cancel events of the guests running now, across requests: what a drain waits
    for and what a shutdown past its grace period stops."""

    def __init__(self) -> None:
        self._events: list[threading.Event] = []
        self._lock = threading.Lock()

    def add(self, cancel: threading.Event) -> None:
        with self._lock:
            self._events.append(cancel)

    def remove(self, cancel: threading.Event) -> None:
        with self._lock:
            self._events.remove(cancel)

    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def cancel_all(self) -> None:
        with self._lock:
            for cancel in self._events:
                cancel.set()


class _Choices:
    """The guests of one request's choices while they run: counted in the tenant's active
    gauge and among the host's running guests; the model they use is held loaded until the
    last has stopped (then `release_model`)."""

    def __init__(
        self, running: _RunningGuests, release_model: Callable[[], None], cancel: threading.Event, n: int, active: Any
    ) -> None:
        self.running, self.release_model, self.cancel, self.active = running, release_model, cancel, active
        self._left = n
        self._lock = threading.Lock()

    def started(self) -> None:
        self.active.inc()
        self.running.add(self.cancel)

    def stopped(self) -> None:
        self.active.dec()
        self.running.remove(self.cancel)
        self.never_started()

    def never_started(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.release_model()


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


def _tenant_ring(tenants: list[TenantSettings]) -> KeyRing:
    return KeyRing({k: t.name for t in tenants for k in t.keys})


def _metrics_ring(settings: ServerSettings) -> KeyRing:
    return KeyRing({h: "metrics" for h in settings.metrics_keys or () if h != ALL_KEYS})


def describe_failure(error: BaseException) -> RealmError:
    """The RealmError to report for a request's failure (a non-Realm exception is a fault
    of the server: InternalError, details in the log)."""
    if isinstance(error, RealmError):
        return error
    return InternalError(f"internal error ({type(error).__name__}); details are in the server's log")


def is_guest_trap(error: BaseException) -> bool:
    return isinstance(error, (GuestFault, AbiVersionMismatch))
