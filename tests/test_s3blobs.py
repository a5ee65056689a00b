"""The S3 blob store (lightmail/storage/s3blobs.py) against an S3 server of its own
(tests/s3server.py: moto's server mode, with SigV4 credentials it checks and S3's
refusal of a body that does not match its x-amz-checksum-sha256)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from lightmail.config import Config, parse_config
from lightmail.storage.blobstores import blob_store
from lightmail.storage.interfaces import (
    BlobDamaged,
    BlobHandoff,
    BlobMissing,
    BlobRef,
    IBlobStore,
)
from lightmail.storage.s3client import S3Error, S3Refused
from tests.s3server import S3Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


def s3_config(s3server: S3Server, tmp: Path, extra: str = "", **s3: Any) -> Config:
    """A configuration whose blobs are in the test server's bucket, under a prefix of
    their own (the tests of this module share the server)."""
    s3.setdefault("prefix", f"t{uuid.uuid4().hex[:10]}/")
    return parse_config(
        f"[server]\nstate_dir = {tmp / 'state'}\n[storage]\nblob_backend = s3\n"
        + extra + s3server.config(tmp, **s3), str(tmp / "lm.conf"))


@pytest.fixture
def store(s3server: S3Server, tmp_path: Path) -> Iterator[Any]:
    s3 = blob_store(s3_config(s3server, tmp_path), "s3")
    try:
        yield s3
    finally:
        s3.close()


def in_bucket(s3server: S3Server, store: Any, blob_id: str) -> bytes | None:
    """The object of ``blob_id`` as the server has it (None: there is none)."""
    client = s3server.client()
    try:
        answer = client.get_object(Bucket=s3server.bucket, Key=store.key(blob_id))
    except client.exceptions.NoSuchKey:
        return None
    return bytes(answer["Body"].read())


def message(size: int, subject: str = "hello") -> bytes:
    head = f"Subject: {subject}\r\n\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrst\r\n"
    return head + (line * (size // len(line) + 1))[:size - len(head)]


def spooled(store: Any) -> list[str]:
    return sorted(name for name in os.listdir(store.spool_dir) if name.endswith(".tmp"))


@pytest_twisted.inlineCallbacks
def test_a_written_blob_is_stored_under_its_sha256_and_reads_back(store, s3server):
    content = message(600_000)              # past FLUSH_THRESHOLD: spooled to disk
    writer = store.writer()
    for start in range(0, len(content), 65536):
        writer.write(content[start:start + 65536])
    ref = yield writer.finish()
    assert ref == BlobRef(hashlib.sha256(content).hexdigest(), len(content))
    assert ref.headers == b"Subject: hello\r\n\r\n"
    assert store.key(ref.id) == f"{store.prefix}{ref.id[:2]}/{ref.id}"
    assert in_bucket(s3server, store, ref.id) == content
    assert spooled(store) == []
    assert (yield store.read(ref.id)) == content
    store.cache.drop(ref.id)                # the ranges from the server, not the cache
    assert (yield store.read_range(ref.id, 18, 10)) == content[18:28]
    assert (yield store.read_range(ref.id, len(content) - 3, 10)) == content[-3:]
    assert (yield store.read_range(ref.id, len(content) + 5, 10)) == b""
    assert (yield threads.deferToThread(store.read_now, ref.id, 7)) == content[:7]
    small = yield store.put(b"Subject: x\r\n\r\nshort\r\n")
    found = yield store.read_many([small.id, "0" * 64, ref.id])
    assert found[0] == b"Subject: x\r\n\r\nshort\r\n" and found[2] == content
    assert isinstance(found[1], BlobMissing)
    with pytest.raises(BlobMissing):
        yield store.read("f" * 64)
    assert (yield threads.deferToThread(store.exists_now, small.id)) is True
    assert (yield threads.deferToThread(store.exists_now, "f" * 64)) is False


@pytest_twisted.inlineCallbacks
def test_staged_blobs_are_uploaded_only_by_their_commit(store, s3server):
    first, second = message(300_000, "first"), message(2000, "second")
    staged = []
    for content in (first, second):
        writer = store.writer()
        writer.write(content)
        staged.append((yield writer.stage()))
    assert [blob.durable for blob in staged] == [False, False]
    assert in_bucket(s3server, store, staged[0].ref.id) is None
    assert (yield store.read_staged(staged[0])) == first
    assert (yield store.read_staged(staged[1])) == second
    outcomes = yield threads.deferToThread(store.commit_staged_now, staged)
    assert outcomes == [None, None]
    assert (yield threads.deferToThread(store.commit_staged_now, [])) == []
    assert [blob.durable for blob in staged] == [True, True]
    assert in_bucket(s3server, store, staged[0].ref.id) == first
    assert in_bucket(s3server, store, staged[1].ref.id) == second
    assert spooled(store) == []
    # One dropped before its commit: nothing reaches the bucket, its spool file goes.
    writer = store.writer()
    writer.write(message(400_000, "dropped"))
    dropped = yield writer.stage()
    dropped.discard()
    assert spooled(store) == []
    with pytest.raises(BlobMissing):
        yield dropped.commit()
    assert in_bucket(s3server, store, dropped.ref.id) is None


@pytest_twisted.inlineCallbacks
def test_a_large_message_goes_up_in_parts(s3server, tmp_path):
    store = blob_store(s3_config(s3server, tmp_path, multipart_threshold="5M",
                                 part_size="5M"), "s3")
    try:
        content = message(11 * MiB + 100)
        writer = store.writer()
        for start in range(0, len(content), MiB):
            writer.write(content[start:start + MiB])
            yield writer.drained()
        ref = yield writer.finish()
        head = s3server.client().head_object(Bucket=s3server.bucket, Key=store.key(ref.id))
        assert head["ETag"].strip('"').endswith("-3")       # three parts: 5M, 5M, 1M
        assert head["ContentLength"] == len(content)
        assert in_bucket(s3server, store, ref.id) == content
        assert (yield store.read(ref.id)) == content
        assert spooled(store) == []
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_content_that_does_not_match_its_checksum_is_refused(store, s3server, tmp_path):
    # A handoff (from another process) whose octets are not what its id says: the
    # server refuses the PUT (BadDigest), and nothing is stored under the id.
    lie = BlobRef(hashlib.sha256(b"what the id says").hexdigest(), 16)
    refused = store.adopt(BlobHandoff(None, b"something else!!", lie))
    with pytest.raises(S3Refused, match="BadDigest"):
        yield refused.commit()
    assert not refused.durable
    assert in_bucket(s3server, store, lie.id) is None
    # A large one: its parts are checked one by one as they go; the whole is checked
    # against the id before the upload is completed, else aborted.
    big = BlobRef(hashlib.sha256(b"not this").hexdigest(), 6 * MiB)
    spool = tmp_path / "big.tmp"
    spool.write_bytes(b"x" * (6 * MiB))
    lone = blob_store(s3_config(s3server, tmp_path, multipart_threshold="5M",
                                part_size="5M"), "s3")
    try:
        with pytest.raises(BlobDamaged):
            yield lone.adopt(BlobHandoff(str(spool), b"", big)).commit()
        assert not spool.exists()
        uploads = s3server.client().list_multipart_uploads(
            Bucket=s3server.bucket, Prefix=lone.prefix)
        assert uploads.get("Uploads", []) == []
        assert in_bucket(s3server, lone, big.id) is None
    finally:
        lone.close()


@pytest_twisted.inlineCallbacks
def test_the_read_cache_is_bounded_and_serves_while_the_server_is_away(s3server, tmp_path):
    store = blob_store(s3_config(s3server, tmp_path, read_cache_size="1M", timeout="1s",
                                 retries=0), "s3")
    try:
        contents = [message(100_000, f"n{n}") for n in range(20)]
        refs = []
        for content in contents:
            refs.append((yield store.put(content)))
        for ref in refs:
            yield store.read(ref.id)
        assert store.cache.size <= MiB
        assert 5 <= len(store.cache) < 20
        big = yield store.put(message(200_000, "big"))      # over 1M/8: never kept
        yield store.read(big.id)
        assert store.cache.get(big.id) is None
        s3server.pause()
        try:
            # The last read are in the cache; the first had to make room for them.
            assert (yield store.read(refs[-1].id)) == contents[-1]
            assert (yield store.read_range(refs[-1].id, 9, 5)) == contents[-1][9:14]
            with pytest.raises(S3Error):
                yield store.read(refs[0].id)
        finally:
            s3server.resume()
        assert (yield store.read(refs[0].id)) == contents[0]
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_a_handoff_is_uploaded_by_the_process_that_adopts_it(s3server, tmp_path):
    config = s3_config(s3server, tmp_path)
    here, writer_process = blob_store(config, "s3"), blob_store(config, "s3")
    try:
        content = message(700_000, "handed over")
        writer = here.writer()
        for start in range(0, len(content), 100_000):
            writer.write(content[start:start + 100_000])
        staged = yield writer.stage()
        handoff = staged.handoff()
        assert handoff.path is not None and Path(handoff.path).exists()
        assert len(handoff.data) + Path(handoff.path).stat().st_size == len(content)
        adopted = writer_process.adopt(handoff)
        assert (yield threads.deferToThread(writer_process.commit_staged_now,
                                            [adopted])) == [None]
        assert not Path(handoff.path).exists()
        assert (yield here.read(staged.ref.id)) == content
    finally:
        here.close()
        writer_process.close()


@pytest_twisted.inlineCallbacks
def test_requests_with_a_wrong_secret_are_refused(s3server, tmp_path):
    config = s3_config(s3server, tmp_path)
    (tmp_path / "s3.secret").write_text("not-the-secret\n")
    wrong = blob_store(parse_config(config.text, config.path), "s3")
    try:
        with pytest.raises(S3Error, match=r"403|Forbidden|Signature"):
            yield wrong.put(b"Subject: no\r\n\r\n")
    finally:
        wrong.close()


@pytest_twisted.inlineCallbacks
def test_garbage_collection_deletes_unreferenced_objects(s3server, tmp_path):
    from lightmail.directory.sql import SQLDirectory
    from lightmail.storage.service import StorageService
    config = s3_config(s3server, tmp_path,
                       extra=f"url = sqlite:///{tmp_path / 'lm.db'}\n")
    storage = StorageService(config)
    storage.startService()
    try:
        yield storage.ready
        store: IBlobStore = storage.blobs
        directory = SQLDirectory(storage.db)
        yield directory.add_domain("example.test")
        yield directory.add_user("bob@example.test", None)
        bob = yield directory.get_user("bob@example.test")
        box = yield storage.mailstore.get_or_create_mailbox(bob.id, "INBOX")
        appended = {}
        for subject in ("kept", "expunged"):
            writer = store.writer()
            writer.write(message(1000, subject))
            appended[subject] = yield storage.mailstore.append(box.id,
                                                               (yield writer.stage()))
        kept_id, gone_id = [info.blob_id for info in
                            (yield storage.mailstore.list_messages(box.id))]
        yield storage.mailstore.expunge(box.id, [appended["expunged"].uid])
        orphan = yield store.put(b"Subject: nobody's\r\n\r\n")     # no row at all
        client = s3server.client()
        stale = client.create_multipart_upload(Bucket=s3server.bucket,
                                               Key=f"{store.prefix}00/unfinished")
        old_spool = Path(config.s3_spool_dir) / "blob-left.tmp"
        old_spool.write_bytes(b"half a message")
        os.utime(old_spool, (time.time() - 7200, time.time() - 7200))
        yield task.deferLater(reactor, 1.1, lambda: None)   # LastModified: seconds
        with store.pin_now():                               # a backup holds it
            assert (yield storage.mailstore.collect_garbage(0)) == 0
        assert (yield storage.mailstore.collect_garbage(0)) == 2
        assert in_bucket(s3server, store, kept_id) is not None
        assert in_bucket(s3server, store, orphan.id) is None
        assert in_bucket(s3server, store, gone_id) is None
        listed = client.list_objects_v2(Bucket=s3server.bucket, Prefix=store.prefix)
        assert [item["Key"] for item in listed.get("Contents", [])] == [
            store.key(kept_id)]
        uploads = client.list_multipart_uploads(Bucket=s3server.bucket,
                                                Prefix=store.prefix).get("Uploads", [])
        assert stale["UploadId"] not in [upload["UploadId"] for upload in uploads]
        assert not old_spool.exists()
    finally:
        yield storage.stopService()


def test_the_s3_section_is_checked_and_its_secret_never_shown(tmp_path):
    from lightmail.config import ConfigError
    secret = tmp_path / "s3.secret"
    secret.write_text("very-secret-key\n")
    base = f"[server]\nstate_dir = {tmp_path}\n[storage]\nblob_backend = s3\n"
    with pytest.raises(ConfigError, match=r"\[s3\] bucket: blob_backend = s3 needs"):
        parse_config(base + "[s3]\naccess_key = k\n", "lm.conf")
    with pytest.raises(ConfigError, match="secret_key_file"):
        parse_config(base + "[s3]\nbucket = b\naccess_key = k\n", "lm.conf")
    with pytest.raises(ConfigError, match="expected a prefix"):
        parse_config(base + "[s3]\nprefix = /mail\n", "lm.conf")
    with pytest.raises(ConfigError, match="at least 5242880"):
        parse_config(base + "[s3]\npart_size = 1M\n", "lm.conf")
    config = parse_config(base + f"[s3]\nbucket = b\naccess_key = k\n"
                          f"secret_key_file = {secret}\n", "lm.conf")
    assert config.s3.secret_key == "very-secret-key"
    assert "very-secret-key" not in repr(config) and "very-secret-key" not in config.text
    assert config.s3_spool_dir == tmp_path / "s3-spool"
    # Named for a migration while the blobs are still on the filesystem: read too.
    config = parse_config(base.replace("= s3", "= filesystem") + f"[s3]\nbucket = b\n"
                          f"secret_key_file = {secret}\n", "lm.conf")
    assert config.s3.secret_key == "very-secret-key"
