"""/v1/embeddings through the official `openai` client against a real server and the real
smollm2-135m: pooled, normalised hidden states; per-tenant permissions; bounded input."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from test_server import serving, smollm2_settings

from realm.engine.embeddings import pooled_embedding

MODEL = "smollm2-135m"
KEYS = {"open": "realm-test-open", "none": "realm-test-none"}
SENTENCES = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue rose by four percent."]


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serving(smollm2_settings(KEYS, {"none": {"models": []}})) as s:
        yield s


def client(server, tenant: str = "open") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEYS[tenant], max_retries=0)


def test_embeddings_are_unit_vectors_that_put_related_sentences_closer(server, smollm2):
    reply = client(server).embeddings.create(model=MODEL, input=SENTENCES)  # the client asks for base64
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2] and vectors.shape == (3, smollm2.config.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2] and cos[0, 1] > cos[1, 2]  # the two cats, not the revenue
    tokens = [smollm2.tokenizer.encode(s) for s in SENTENCES]  # smollm2 adds no BOS
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(t) for t in tokens)
    # the same vector in floats, from a token array, and from the engine directly
    floats = client(server).embeddings.create(model=MODEL, input=tokens[0], encoding_format="float")
    assert np.array_equal(np.float32(floats.data[0].embedding), vectors[0].astype(np.float32))
    assert np.allclose(pooled_embedding(smollm2, tokens[0]), vectors[0], atol=1e-6)


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": [""]},
        {"input": ["a"] * 65},
        {"input": [[1, 2, 49152]]},
        {"input": [7] * 513},
        {"input": "a", "dimensions": 100},
        {"input": "a", "encoding_format": "int8"},
    ],
    ids=["empty", "empty-text", "too-many", "outside-vocab", "too-long", "dimensions", "encoding"],
)
def test_bad_input_is_a_clear_400(server, body):
    r = httpx.post(server.base + "/v1/embeddings", json={"model": MODEL, **body}, headers=_auth("open"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] in body


def test_a_tenant_may_only_embed_with_its_models(server):
    with pytest.raises(openai.PermissionDeniedError):
        client(server, "none").embeddings.create(model=MODEL, input="hello")


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}
