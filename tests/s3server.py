"""An S3-compatible server for the tests: moto's server mode (moto[server], PyPI), in a
process of its own on a free port, with a bucket and credentials that it checks.

Why moto: no S3 server installs from the registries this project uses (Debian 12 has
no MinIO nor Garage, and its Ceph RADOS Gateway needs a whole Ceph cluster and
predates x-amz-checksum-*; PyPI's "minio" is the client library).  Moto is the
S3 implementation botocore's own users test against, and it speaks the real
protocol over HTTP: SigV4 signatures (checked here: the server is started with an
IAM user of its own and refuses any other key), multipart uploads, ranges, listings.

What moto does not do, S3 does: refuse a PUT whose body does not match the
``x-amz-checksum-sha256`` it declares (S3 answers 400 BadDigest).  The
:class:`ChecksumCheck` layer in front of moto does that, as S3 documents it, so that
the store's handling of the refusal is tested; it checks nothing else.

Run as a program: prints ``PORT ACCESS_KEY SECRET_KEY`` on its first line once it
serves, and serves until killed.  :class:`S3Server` starts and stops one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
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
    app = ChecksumCheck(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, access, secret, flush=True)
    server.serve_forever()


class S3Server:
    """A private S3 server (this module, run as a program) for one test."""

    def __init__(self) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise AssertionError("moto[server] is missing: pip install -e '.[test]'"
                                 ) from None
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != 3:
            self.stop()
            raise AssertionError("the test S3 server (moto) did not start")
        port, self.access_key, self.secret_key = first
        self.port = int(port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = BUCKET

    def config(self, tmp: Path, **more: Any) -> str:
        """The [storage] and [s3] lines of a LightMail configuration that uses it."""
        secret = tmp / "s3.secret"
        secret.write_text(self.secret_key + "\n")
        secret.chmod(0o600)
        keys = {"endpoint": self.endpoint, "bucket": self.bucket,
                "access_key": self.access_key, "secret_key_file": secret,
                "timeout": "2s", "retries": 1, **more}
        return "[s3]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())

    def client(self) -> Any:
        """A boto3 client of its own (to look at the bucket behind the store's back)."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

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


if __name__ == "__main__":
    main()
