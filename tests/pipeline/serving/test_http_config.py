from pathlib import Path

import pytest

from pipeline.serving.config import API_KEY_VARIABLE, HttpConfig


def test_the_key_comes_from_the_flag_the_file_or_the_environment_in_that_order(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    environ = {API_KEY_VARIABLE: "from-env"}
    assert HttpConfig(api_key="flag").key(environ) == "flag"
    assert HttpConfig(api_key_file=key_file).key(environ) == "s3cret"  # a file keeps it out of `ps`
    assert HttpConfig().key(environ) == "from-env"
    assert HttpConfig().key({}) == ""


def test_a_key_given_twice_or_an_empty_or_missing_file_is_refused_by_its_option(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--api-key or --api-key-file, not both"):
        HttpConfig(api_key="a", api_key_file=empty).key({})
    with pytest.raises(ValueError, match="--api-key-file .* is empty"):
        HttpConfig(api_key_file=empty).key({})
    with pytest.raises(ValueError, match="--api-key-file .*missing"):
        HttpConfig(api_key_file=tmp_path / "missing").key({})


def test_serving_beyond_this_host_without_a_key_is_warned_of():
    warning = HttpConfig(host="0.0.0.0", port=8000).exposure_warning("")
    assert warning is not None and "0.0.0.0" in warning and "--api-key-file" in warning
    assert HttpConfig(host="0.0.0.0").exposure_warning("key") is None
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert HttpConfig(host=loopback).exposure_warning("") is None


@pytest.mark.parametrize("field, value, option", [("client_timeout_s", 0.0, "--client-timeout"),
                                                  ("keep_alive_timeout_s", -1.0, "--keep-alive-timeout"),
                                                  ("max_connections", 0, "--max-connections")])
def test_a_timeout_or_limit_that_would_refuse_everything_is_refused_by_its_option(field, value, option):
    with pytest.raises(ValueError, match=option):
        HttpConfig(**{field: value}).validate()
