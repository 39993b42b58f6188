"""Store URLs and S3 client settings: parsing, precedence, the credentials file, no leaked secret."""

import os

import pytest

from chunkstore.errors import ConfigError, StoreUrlError
from chunkstore.s3settings import S3Location, S3Settings, is_store_url, parse_store_url

SECRET = "s3cr3t-Value-That-Must-Not-Leak"


@pytest.mark.parametrize("text, bucket, prefix", [
    ("s3://bucket", "bucket", ""),
    ("s3://bucket/", None, None),                # trailing slash refused
    ("s3://my-bucket/store", "my-bucket", "store"),
    ("s3://b.c.d/p/q/r", "b.c.d", "p/q/r"),
    ("S3://upper/x", "upper", "x"),
])
def test_parse_store_url(text, bucket, prefix):
    if bucket is None:
        with pytest.raises(StoreUrlError, match="trailing"):
            parse_store_url(text)
        return
    loc = parse_store_url(text)
    assert loc == S3Location(bucket, prefix)
    assert loc.url == (f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
    assert parse_store_url(loc.url) == loc


def test_keys_are_relative_to_the_prefix():
    assert S3Location("b", "p/q").key("packs/ab/x.pack") == "p/q/packs/ab/x.pack"
    assert S3Location("b", "").key("config.json") == "config.json"


@pytest.mark.parametrize("path", ["/srv/store", "store", "./s3:/x", "", "s3:/bucket"])
def test_local_paths_are_not_urls(path):
    assert parse_store_url(path) is None and not is_store_url(path)


@pytest.mark.parametrize("text, words", [
    ("s3://", "names no bucket"),
    ("s3:///prefix", "names no bucket"),
    ("s3://ab/x", "not a valid bucket name"),
    ("s3://Bucket/x", "not a valid bucket name"),
    ("s3://-bucket/x", "not a valid bucket name"),
    ("s3://bucket/a//b", "empty, '.' or '..'"),
    ("s3://bucket/a/../b", "empty, '.' or '..'"),
    ("s3://bucket/a b", "no query"),
    ("s3://bucket/a?x=1", "no query"),
])
def test_bad_urls_are_usage_errors(text, words):
    with pytest.raises(StoreUrlError) as info:
        parse_store_url(text)
    assert words in str(info.value) and info.value.exit_code == 2


def test_a_url_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(StoreUrlError) as info:
        parse_store_url(f"s3://AKIDEXAMPLE:{SECRET}@bucket/p")
    assert SECRET not in str(info.value) and "AKIDEXAMPLE" not in str(info.value)
    assert "BLOCKVAULT_S3_SECRET_ACCESS_KEY" in str(info.value)


def _file(tmp_path, text, mode=0o600):
    path = tmp_path / "creds"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


ENV = {"BLOCKVAULT_S3_ENDPOINT": "http://env.example:7480", "BLOCKVAULT_S3_ACCESS_KEY_ID": "envkey",
       "BLOCKVAULT_S3_SECRET_ACCESS_KEY": "envsecret", "BLOCKVAULT_S3_REGION": "env-region"}


def test_environment_is_used_when_nothing_explicit():
    s = S3Settings.resolve(env=dict(ENV))
    assert (s.endpoint, s.access_key, s.secret_key, s.region) == (
        "http://env.example:7480", "envkey", "envsecret", "env-region")


def test_explicit_endpoint_and_file_win_over_the_environment(tmp_path):
    path = _file(tmp_path, "# test keys\naccess_key_id = filekey\nsecret_access_key = filesecret\n"
                           "region = file-region\nendpoint = http://file.example:1\n")
    s = S3Settings.resolve(credentials_file=path, env=dict(ENV))
    assert (s.endpoint, s.access_key, s.secret_key, s.region) == (
        "http://file.example:1", "filekey", "filesecret", "file-region")
    s = S3Settings.resolve(endpoint="https://arg.example/", credentials_file=path, env=dict(ENV))
    assert s.endpoint == "https://arg.example"  # the argument, trailing / dropped


def test_nothing_set_leaves_it_to_boto3():
    s = S3Settings.resolve(env={})
    assert s.endpoint is None and s.access_key is None and s.secret_key is None and s.region == "us-east-1"
    assert S3Settings.resolve(env={"AWS_DEFAULT_REGION": "eu-west-3"}).region == "eu-west-3"


def test_half_a_key_pair_is_refused():
    with pytest.raises(ConfigError, match="BLOCKVAULT_S3_SECRET_ACCESS_KEY is not set"):
        S3Settings.resolve(env={"BLOCKVAULT_S3_ACCESS_KEY_ID": "k"})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_credentials_file_others_may_read_is_refused(tmp_path, mode):
    path = _file(tmp_path, f"access_key_id = k\nsecret_access_key = {SECRET}\n", mode)
    with pytest.raises(ConfigError) as info:
        S3Settings.resolve(credentials_file=path, env={})
    assert f"chmod 600 {path}" in str(info.value) and SECRET not in str(info.value)


def test_a_malformed_credentials_line_is_named_without_its_content(tmp_path):
    path = _file(tmp_path, f"access_key_id = k\n{SECRET}\n")
    with pytest.raises(ConfigError) as info:
        S3Settings.resolve(credentials_file=path, env={})
    assert "line 2" in str(info.value) and SECRET not in str(info.value)


def test_a_missing_credentials_file_and_ca_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read credentials file"):
        S3Settings.resolve(credentials_file=str(tmp_path / "nope"), env={})
    with pytest.raises(ConfigError, match="CA file .* does not exist"):
        S3Settings.resolve(ca_file=str(tmp_path / "ca.pem"), env={})


def test_bad_endpoint_and_timeouts():
    with pytest.raises(ConfigError, match="not an http"):
        S3Settings.resolve(endpoint="127.0.0.1:7480", env={})
    with pytest.raises(ConfigError, match="BLOCKVAULT_S3_READ_TIMEOUT"):
        S3Settings.resolve(env={"BLOCKVAULT_S3_READ_TIMEOUT": "soon"})
    s = S3Settings.resolve(env={"BLOCKVAULT_S3_READ_TIMEOUT": "2.5", "BLOCKVAULT_S3_MAX_ATTEMPTS": "2"})
    assert s.read_timeout == 2.5 and s.max_attempts == 2


def test_the_secret_is_never_in_repr():
    s = S3Settings.resolve(env=dict(ENV, BLOCKVAULT_S3_SECRET_ACCESS_KEY=SECRET))
    assert s.secret_key == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in f"{s!r} {[s]}"
