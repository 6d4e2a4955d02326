"""A model loaded on a backend: the file, its config, tokenizer, template and packed weights."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realm.backends import packed_cache
from realm.backends.devices import Backend, BackendKind, cpu_backend
from realm.engine import compiled_step
from realm.engine.generation import Generation
from realm.engine.grammar import compile_grammar
from realm.engine.kv_cache import KVPool
from realm.engine.memory import rss_bytes, weight_bytes
from realm.engine.sampling import SamplingParams
from realm.engine.session import Session
from realm.errors import InvalidArgument
from realm.files import sha256_file
from realm.models import catalogue
from realm.models import prompt as prompt_rule
from realm.models.chat_template import ChatTemplate, chat_template_from_fields
from realm.models.config import ModelConfig
from realm.models.gguf_file import GGUFFile, transient_heap
from realm.models.loader import PackLinear, PackOutput, checked_config, load_weights
from realm.models.tokenizer import Tokenizer
from realm.models.transformer import Transformer, Weights

log = logging.getLogger(__name__)


@dataclass
class Model:
    name: str
    path: Path
    sha256: str
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    transformer: Transformer
    backend: Backend
    load_seconds: float
    chat_template_error: str | None  # why a template the file has cannot be used
    rss_after_load: int  # this process's resident bytes right after loading (0 if unknown)
    kv_pool: KVPool  # the keys and values of all this model's sessions

    def new_session(self, context_length: int | None = None) -> Session:
        """A fresh session; its context is the model's unless a smaller one is asked for."""
        n = context_length or self.config.context_length
        if not 0 < n <= self.config.context_length:
            raise InvalidArgument(f"context length {n} is outside 1..{self.config.context_length} for {self.name}")
        return Session(self.transformer, n, self.kv_pool)

    @property
    def decode_step(self) -> str:
        """What decodes this model: `compiled`, `building` (eager while a build runs) or `eager`."""
        if self.transformer.compiled:
            return "compiled"
        return "building" if compiled_step.status(self.sha256) == "building" else "eager"

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        """Prompt text -> tokens by the one prompt rule (models/prompt.py); with `chat`, the
        text is a user message in the model's template."""
        if chat:
            return self.prompt_tokens(messages=[{"role": "user", "content": text}])
        return self.prompt_tokens(prompt=text)

    def prompt_tokens(
        self, *, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """A request's tokens: a plain `prompt` or chat `messages` (models/prompt.py)."""
        why = self.chat_template_error or "it has no chat template (tokenizer.chat_template): send a plain prompt"
        return prompt_rule.prompt_tokens(
            self.tokenizer,
            self.chat_template,
            prompt=prompt,
            messages=messages,
            cannot_chat=f"model {self.name} cannot chat: {why}",
        )

    def generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 128,
        params: SamplingParams | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
        constraint: Mapping[str, Any] | None = None,
    ) -> Generation:
        """A streaming generation: iterate it for `Piece`s of text as tokens are made.
        `constraint`: what the output must match (engine/grammar.py)."""
        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt, chat)
        grammar = None if constraint is None else compile_grammar(self.tokenizer, self.config.vocab_size, constraint)
        return Generation(
            self.tokenizer, self.new_session(), ids, params or SamplingParams(), max_tokens, stop or [], grammar
        )

    @property
    def bytes_held(self) -> int:
        """Bytes of packed weights this model holds in memory (the file's pages not counted)."""
        return weight_bytes(self.transformer.weights)

    def info(self) -> dict[str, Any]:
        """What guests, `realm inspect` and `/v1/models` show about this model: shape,
        placement and tokenizer facts (the model store adds its identity)."""
        cfg, tok = self.config, self.tokenizer
        return {
            "name": self.name,
            "sha256": self.sha256,
            "architecture": cfg.architecture,
            "parameters": sum(math.prod(t.shape) for t in self.gguf.tensors.values()),
            "layers": cfg.n_layers,
            "embedding_length": cfg.dim,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length,
            "quantization": self.gguf.quant_types(),
            "file_bytes": self.gguf.size_bytes,
            "backend": self.backend.name,
            "device": str(self.backend.device),
            "has_chat_template": self.chat_template is not None,
            "config": dataclasses.asdict(cfg),
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "eot_ids": sorted(tok.eot_ids),
            "add_bos": tok.add_bos,
            "add_space_prefix": tok.add_space_prefix,
            "clean_spaces": tok.clean_spaces,
        }


def load(name_or_path: str, backend: Backend, progress: bool = True, compile_mode: str | None = None) -> Model:
    """A catalogue name (fetched on first use) or a path to a GGUF file, loaded on `backend`."""
    source = catalogue.locate(name_or_path, progress=progress)
    return load_model(source.path, backend, name=source.name, sha256=source.sha256, compile_mode=compile_mode)


def load_model(
    path: str | Path,
    backend: Backend,
    name: str | None = None,
    sha256: str | None = None,
    compile_mode: str | None = None,
    keep_packed: bool = True,
) -> Model:
    """Open a GGUF and pack its weights for `backend`; every defect is a ModelFormatError.
    A model the GPU cannot take runs on the CPU instead (see `_place`): `Model.backend`
    says where it runs. The decode step is the compiled one if it is built, else eager
    (see engine/compiled_step.py; `compile_mode` overrides REALM_COMPILE). `keep_packed`:
    whether its packed weights may be kept on disk for the next load (backends/packed_cache.py);
    not for bytes a tenant handed in, which would each add a copy."""
    started = time.perf_counter()
    path = Path(path)
    name = name or path.stem
    with transient_heap():
        gguf = GGUFFile(path)
        config = checked_config(gguf)
        tokenizer = Tokenizer.from_gguf_fields(gguf.metadata)
        template, template_error = None, None
        try:
            template = chat_template_from_fields(gguf.metadata, tokenizer)
        except InvalidArgument as e:  # a broken template only breaks chat, not completion
            template_error = f"its chat template does not compile: {e}"
        gguf.drop_vocabulary_arrays()
        sha256 = sha256 or sha256_file(path)
        weights, kv_pool, backend = _place(gguf, config, backend, name, sha256 if keep_packed else None)
        gguf.drop_resident_pages()
    model = Model(
        name=name,
        path=path,
        sha256=sha256,
        gguf=gguf,
        config=config,
        tokenizer=tokenizer,
        chat_template=template,
        chat_template_error=template_error,
        transformer=Transformer(config, weights, backend.paged_attention),
        kv_pool=kv_pool,
        backend=backend,
        load_seconds=time.perf_counter() - started,
        rss_after_load=rss_bytes(),
    )
    compiled_step.attach(model, compile_mode)
    return model


def _place(
    gguf: GGUFFile, config: ModelConfig, backend: Backend, name: str, sha256: str | None
) -> tuple[Weights, KVPool, Backend]:
    """The weights packed for `backend` and the KV pool on its device, and that backend.

    A GPU that fails (out of memory, or any other error the device raises while it takes
    the weights) is not the end of the chain: the model then goes to the CPU, with a
    warning that names it and the error. An error on the CPU is the end."""
    try:
        return _pack(gguf, config, backend, sha256), KVPool(config, backend.device, backend.kv_dtype), backend
    except RuntimeError as error:
        if backend.kind != BackendKind.GPU:
            raise
        log.warning("model %s does not load on %s (%s); it runs on the CPU instead", name, backend.description, error)
    cpu = cpu_backend()  # after the except block: the GPU's partial weights are freed by now
    return _pack(gguf, config, cpu, sha256), KVPool(config, cpu.device, cpu.kv_dtype), cpu


def _pack(gguf: GGUFFile, config: ModelConfig, backend: Backend, sha256: str | None) -> Weights:
    """The weights packed for `backend`; on the CPU with Realm's kernels, the matrices
    come from (or go to) the packed-weights file of the model `sha256` (none if None:
    backends/packed_cache.py)."""
    pack_linear: PackLinear = backend.pack_linear
    pack_output: PackOutput = backend.pack_output
    cache: packed_cache.PackedCache | None = None
    if sha256 is not None and backend.kind == BackendKind.CPU and packed_cache.wanted(gguf):
        cache = packed_cache.PackedCache(sha256, gguf)
        pack_linear, pack_output = cache.pack_linear(pack_linear), cache.pack_output(pack_output)
    weights = load_weights(gguf, config, pack_linear, pack_output, backend.make_embedding, backend.make_vector)
    if cache is not None:
        cache.save()
    return weights
