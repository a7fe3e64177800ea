"""Blob source URLs, SAS normalisation and the retry helper (no service needed)."""

from __future__ import annotations

import pytest
import trio

from azfs.blob.sas import sas_expiry
from azfs.blob.url import normalize_sas, parse_blob_url
from azfs.errors import BackendUnavailable, NotFound, TemporaryFailure, UserError
from azfs.retry import RetryPolicy, is_transient, retry

SAS = "sv=2021-08-06&se=2030-01-01T00%3A00%3A00Z&sr=c&sp=rl&sig=abc%2Bdef%3D"


def test_azure_url_with_prefix_and_sas():
    src = parse_blob_url(f"https://myacct.blob.core.windows.net/data/images/train?{SAS}")
    assert src.account_url == "https://myacct.blob.core.windows.net"
    assert (src.account, src.container, src.prefix) == ("myacct", "data", "images/train/")
    assert src.sas is not None and src.sas.reveal() == SAS
    assert "sig" not in repr(src) and "abc" not in src.display


def test_azurite_url_is_path_style():
    src = parse_blob_url(f"http://127.0.0.1:10000/devstoreaccount1/data?{SAS}")
    assert src.account_url == "http://127.0.0.1:10000/devstoreaccount1"
    assert (src.account, src.container, src.prefix) == ("devstoreaccount1", "data", "")
    assert parse_blob_url("http://localhost:1/devstoreaccount1/data/x/").prefix == "x/"


def test_url_without_sas():
    assert parse_blob_url("https://a1b.blob.core.windows.net/cont").sas is None


@pytest.mark.parametrize("url", [
    "ftp://a.blob.core.windows.net/c",
    "https://a.blob.core.windows.net/",
    "https://myacct.blob.core.windows.net/UPPER",
    "https://myacct.blob.core.windows.net/c",
    "https://myacct.blob.core.windows.net/bad--name",
    "https://myacct.blob.core.windows.net/data/../etc",
    "http://127.0.0.1:10000/",
    "http://127.0.0.1:10000/devstoreaccount1",
    "https://myacct.blob.core.windows.net/data?sv=1&sp=rl",
    "https://myacct.blob.core.windows.net/data#frag",
])
def test_bad_urls_are_user_errors(url):
    with pytest.raises(UserError):
        parse_blob_url(url)


def test_sas_forms_and_expiry():
    for form in (SAS, "?" + SAS, f"https://a.blob.core.windows.net/c?{SAS}"):
        assert normalize_sas(form) == SAS
    assert sas_expiry(SAS).year == 2030
    assert sas_expiry("sig=x") is None


def test_transient_classification():
    assert is_transient(ConnectionResetError())
    assert is_transient(TemporaryFailure("503"))
    assert not is_transient(NotFound("x"))
    assert not is_transient(UserError("x"))


async def test_retry_until_success_and_until_the_deadline():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert await retry(flaky, "flaky", RetryPolicy(deadline=10, base=0.01)) == "ok"
    assert len(calls) == 3

    async def dead():
        raise ConnectionRefusedError("refused")

    with pytest.raises(BackendUnavailable, match="unreachable"):
        await retry(dead, "dead", RetryPolicy(deadline=0.3, base=0.01, cap=0.05))

    async def permanent():
        calls.append(1)
        raise NotFound("gone")

    before = len(calls)
    with pytest.raises(NotFound):
        await retry(permanent, "permanent", RetryPolicy(deadline=10, base=0.01))
    assert len(calls) == before + 1


async def test_each_attempt_has_a_timeout():
    async def hang():
        await trio.sleep_forever()

    with trio.fail_after(10), pytest.raises(BackendUnavailable):
        await retry(hang, "hang", RetryPolicy(deadline=0.5, attempt_timeout=0.1, base=0.01))
