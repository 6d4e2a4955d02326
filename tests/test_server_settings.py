"""The server's settings (TOML file, environment, CLI flags), API keys and tenant limits:
no model, no server, fast."""

from __future__ import annotations

import re

import pydantic
import pytest
from typer.testing import CliRunner

from realm.cli import app
from realm.errors import InvalidArgument, LimitExceeded
from realm.server.keys import KeyRing, add_key_to_config, hash_key, new_key
from realm.server.settings import ServerSettings, field_lines, load_settings
from realm.server.tenants import TokenBucket

HASH_A = hash_key("key-a")
HASH_B = hash_key("key-b")

GOOD = f"""\
# a two-tenant server
host = "0.0.0.0"
port = 9000
backend = "cpu"
models = ["smollm2-135m", {{ name = "mine", path = "models/mine.gguf" }}]

[[tenants]]
name = "acme"
keys = ["{HASH_A}"]
models = ["smollm2-135m"]
guest = "guests/upper.wasm"

[tenants.limits]
max_concurrent = 2
tokens_per_minute = 6000
max_tokens = 256
guest_memory_mb = 64
guest_seconds = 5

[[tenants]]
name = "open"
open = true
"""


def write(tmp_path, text: str):
    path = tmp_path / "realm.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_default_model_to_one_open_tenant():
    s = load_settings(env={})
    assert (s.host, s.port, s.model_names()) == ("127.0.0.1", 8080, ["smollm2-135m"])
    (tenant,) = s.effective_tenants()
    assert tenant.open and tenant.keys == [] and tenant.guest == "default" and tenant.models == ["*"]


def test_a_full_config(tmp_path):
    s = load_settings(write(tmp_path, GOOD), env={})
    assert (s.host, s.port, s.backend) == ("0.0.0.0", 9000, "cpu")
    assert [(m.name, m.path) for m in s.model_entries()] == [("smollm2-135m", None), ("mine", "models/mine.gguf")]
    acme, open_ = s.tenants
    assert acme.keys == [HASH_A] and acme.models == ["smollm2-135m"]
    assert (acme.limits.max_concurrent, acme.limits.tokens_per_minute, acme.limits.max_tokens) == (2, 6000, 256)
    assert (acme.limits.guest_memory_mb, acme.limits.guest_seconds) == (64, 5)
    assert open_.open and open_.limits.max_concurrent == 4  # defaults
    assert s.resolve_path(acme.guest) == tmp_path / "guests" / "upper.wasm"  # relative to the file


def test_env_and_cli_override_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    s = load_settings(
        path, env={"REALM_PORT": "9100", "REALM_HOST": "10.0.0.1"}, overrides={"port": 9200, "host": None}
    )
    assert (s.host, s.port) == ("10.0.0.1", 9200)
    s = load_settings(env={"REALM_MODELS": "smollm2-135m, /m/other.gguf"})
    assert s.model_names() == ["smollm2-135m", "other"]


def test_toml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(InvalidArgument, match=r"realm\.toml:2: invalid TOML: .*line 2, column 8"):
        load_settings(write(tmp_path, 'host = "a"\nport = = 1\n'), env={})
    with pytest.raises(InvalidArgument, match=r"realm\.toml:3: invalid TOML: .*end of document"):
        load_settings(write(tmp_path, 'host = "a"\nport = 1\nmodels = [\n'), env={})


@pytest.mark.parametrize(
    "edit, line, field",
    [
        (("max_concurrent = 2", "max_concurrent = 0"), 14, "tenants[0].limits.max_concurrent"),
        (("guest_seconds = 5", "guest_seconds = 5\nbogus = 1"), 19, "tenants[0].limits.bogus"),
        (("port = 9000", 'port = "nine"'), 3, "port"),
        ((f'keys = ["{HASH_A}"]', 'keys = ["plain-key"]'), 9, "tenants[0].keys"),
        (('name = "open"', 'name = "bad name!"'), 21, "tenants[1].name"),
        (("open = true", 'open = "yes"'), 22, "tenants[1].open"),
    ],
)
def test_field_errors_name_line_and_field(tmp_path, edit, line, field):
    text = GOOD.replace(*edit)
    with pytest.raises(InvalidArgument) as e:
        load_settings(write(tmp_path, text), env={})
    assert f"realm.toml:{line}: {field}:" in str(e.value)


def test_consistency_errors(tmp_path):
    text = GOOD.replace('models = ["smollm2-135m"]\n', 'models = ["gemma3-270m"]\n', 1)
    with pytest.raises(InvalidArgument, match="does not serve"):
        load_settings(write(tmp_path, text), env={})
    text = GOOD.replace('name = "open"', 'name = "acme"')
    with pytest.raises(InvalidArgument, match="unique"):
        load_settings(write(tmp_path, text), env={})
    text = GOOD.replace("open = true", f'keys = ["{HASH_A}"]')
    with pytest.raises(InvalidArgument, match="share a key"):
        load_settings(write(tmp_path, text), env={})
    with pytest.raises(InvalidArgument, match=r"\$REALM_PORT: port"):
        load_settings(env={"REALM_PORT": "eighty"})


def test_metrics_keys_are_hashes_or_any_tenant(tmp_path):
    assert load_settings(env={}).metrics_keys is None  # open by default
    text = GOOD.replace("port = 9000\n", f'port = 9000\nmetrics_keys = ["*", "{HASH_B}"]\n')
    assert load_settings(write(tmp_path, text), env={}).metrics_keys == ["*", HASH_B]
    for bad, why in (('["realm-plain-key"]', "neither"), ("[]", "at least 1")):
        text = GOOD.replace("port = 9000\n", f"port = 9000\nmetrics_keys = {bad}\n")
        with pytest.raises(InvalidArgument, match=f"realm.toml:4: metrics_keys.*{why}"):
            load_settings(write(tmp_path, text), env={})


def test_field_lines_index_arrays_of_tables():
    lines = field_lines(GOOD)
    assert lines[("port",)] == 3
    assert lines[("tenants", 0)] == 7 and lines[("tenants", 1)] == 20
    assert lines[("tenants", 0, "limits", "max_tokens")] == 16
    assert lines[("tenants", 1, "open")] == 22


def test_keys_are_random_and_stored_hashed():
    a, b = new_key(), new_key()
    assert a != b and a.startswith("realm-") and len(a) > 40
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_key(a))
    ring = KeyRing({hash_key(a): "acme"})
    assert ring.tenant_of(a) == "acme"
    assert ring.tenant_of(b) is None and ring.tenant_of("") is None


def test_keys_new_prints_once_and_adds_the_hash_to_the_config(tmp_path):
    path = write(tmp_path, GOOD)
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "new", "acme", "--config", str(path)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    s = load_settings(path, env={})
    assert s.tenants[0].keys == [HASH_A, hash_key(key)]
    result = runner.invoke(app, ["keys", "new", "open", "--config", str(path)])  # a tenant with no keys yet
    key2 = result.stdout.strip().splitlines()[0]
    assert load_settings(path, env={}).tenants[1].keys == [hash_key(key2)]
    before = path.read_text()
    result = runner.invoke(app, ["keys", "new", "nobody", "--config", str(path)])
    assert result.exit_code == 0 and path.read_text() == before
    assert f'keys = ["{hash_key(result.stdout.strip().splitlines()[0])}"]' in result.stderr
    assert not add_key_to_config(path, "nobody", HASH_B)


def test_serve_with_a_bad_config_is_a_clear_error(tmp_path):
    path = write(tmp_path, GOOD.replace("max_tokens = 256", "max_tokens = -1"))
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    assert "realm.toml:16: tenants[0].limits.max_tokens" in " ".join(result.output.split())


def test_token_bucket():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one token a second
    bucket.take(50)
    with pytest.raises(LimitExceeded) as e:
        bucket.take(20)
    assert e.value.retry_after_s == pytest.approx(10)
    bucket.settle(50, 30)  # used 30 of the 50 reserved
    bucket.take(20)
    now[0] += 30
    bucket.take(30)
    with pytest.raises(InvalidArgument):
        bucket.take(61)


def test_settings_model_is_the_one_schema():
    with pytest.raises(pydantic.ValidationError):
        ServerSettings(port=70000)
    assert ServerSettings(models=["a/b.gguf"]).model_names() == ["b"]
