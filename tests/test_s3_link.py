"""The S3 link: an https:// endpoint whose certificate is checked against [s3] ca_file,
with the secret key from a file, against the test S3 server (moto, tests/s3server.py)
serving HTTPS with a certificate of a test CA (started once for the module).  A CA
that did not sign it, or plain HTTP to it, is refused with the reason, and the secret
shows nowhere."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from lightmail.config import parse_config
from lightmail.storage.blobstores import blob_store
from lightmail.storage.s3client import S3Error
from tests.s3server import S3Server
from tests.testca import TestCA


@pytest.fixture(scope="module")
def https_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, TestCA]]:
    ca = TestCA(tmp_path_factory.mktemp("s3-ca"))
    server = S3Server(tls=ca.issue("s3.test", ips=("127.0.0.1",)))
    try:
        yield server, ca
    finally:
        server.stop()


def store_of(server: S3Server, tmp: Path, **s3: Any) -> Any:
    s3.setdefault("prefix", f"t{uuid.uuid4().hex[:10]}/")
    config = parse_config(f"[server]\nstate_dir = {tmp / 'state'}\n[storage]\n"
                          "blob_backend = s3\n" + server.config(tmp, **s3),
                          str(tmp / "lm.conf"))
    return blob_store(config, "s3")


@pytest_twisted.inlineCallbacks
def test_blobs_go_over_https_checked_against_the_ca_file(https_s3, tmp_path):
    server, ca = https_s3
    assert server.endpoint.startswith("https://")
    store = store_of(server, tmp_path, ca_file=ca.ca_file)
    try:
        ref = yield store.put(b"Subject: tls\r\n\r\nover https\r\n")
        store.cache.drop(ref.id)
        assert (yield store.read(ref.id)) == b"Subject: tls\r\n\r\nover https\r\n"
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_a_certificate_from_another_ca_is_refused(https_s3, tmp_path):
    server, _ = https_s3
    other = TestCA(tmp_path / "other", "Another CA")
    store = store_of(server, tmp_path, ca_file=other.ca_file)
    try:
        with pytest.raises(S3Error) as refused:
            yield store.put(b"Subject: no\r\n\r\n")
    finally:
        store.close()
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert server.secret_key not in str(refused.value)


@pytest_twisted.inlineCallbacks
def test_plain_http_to_it_fails(https_s3, tmp_path):
    server, _ = https_s3
    store = store_of(server, tmp_path, endpoint=server.endpoint.replace("https", "http"))
    try:
        with pytest.raises(S3Error) as refused:
            yield store.put(b"Subject: no\r\n\r\n")
    finally:
        store.close()
    assert server.secret_key not in str(refused.value)
