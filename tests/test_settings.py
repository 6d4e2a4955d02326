"""The host's settings: one reader of the environment, with one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from realm.errors import InvalidArgument
from realm.settings import host_settings


def test_defaults_when_nothing_is_set():
    s = host_settings({})
    assert (s.backend, s.compile, s.kernels, s.max_model_bytes) == ("auto", "auto", "native", 2 << 30)
    assert s.packed_cache == "on"
    assert s.home == Path("~/.cache/realm").expanduser()


def test_values_are_read_and_normalised():
    s = host_settings(
        {
            "REALM_HOME": "~/elsewhere",
            "REALM_BACKEND": "CPU",
            "REALM_COMPILE": "0",
            "REALM_KERNELS": "pytorch",
            "REALM_PACKED_CACHE": "OFF",
            "REALM_MAX_MODEL_BYTES": "1048576",
        }
    )
    assert s.home == Path("~/elsewhere").expanduser()
    assert (s.backend, s.compile, s.kernels, s.max_model_bytes) == ("cpu", "off", "pytorch", 1 << 20)
    assert s.packed_cache == "off"
    assert host_settings({"REALM_COMPILE": " "}).compile == "auto"  # empty is unset


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("REALM_BACKEND", "tpu"),
        ("REALM_COMPILE", "sometimes"),
        ("REALM_KERNELS", "fast"),
        ("REALM_PACKED_CACHE", "maybe"),
        ("REALM_MAX_MODEL_BYTES", "-1"),
        ("REALM_MAX_MODEL_BYTES", "2GB"),
    ],
)
def test_a_bad_value_names_its_variable(var, value):
    with pytest.raises(InvalidArgument, match=rf"^\${var}='{value}': "):
        host_settings({var: value})
