"""A private Redis for tests of the Redis link (Debian's redis-server, built with TLS):
TLS only (``tls-port`` on a free loopback port, no plain port), a server certificate
of a test CA for 127.0.0.1, client certificates required (of the same CA), the
default user off and one ACL user with a password.  It runs in the foreground as a
child process with its own directory, and is killed by :meth:`stop`.  The ACL user
may touch only keys and channels under ``lightmail:`` (the tests' prefixes start so).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.harness import free_port
from tests.testca import TestCA

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
USER = "lightmail"
PASSWORD = "redis-link-secret"
#: What docs/operations.rst advises ("Links between nodes"): LightMail's keys and
#: channels (under the default prefixes), every command but the dangerous ones.
ACL = "~lightmail:* &lightmail:* +@all -@dangerous"


class TLSRedis:
    """``address``: its HOST:PORT; ``ca``: the CA of its certificate and of the
    client certificate ``client`` (cert, key) it accepts."""

    def __init__(self, directory: Path) -> None:
        if not shutil.which(REDIS_SERVER):
            raise AssertionError("redis-server is not installed: run scripts/test-peers.sh "
                                 "(part of `make test`)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(directory / "ca")
        cert, key = self.ca.issue("redis.test", ips=("127.0.0.1",))
        self.client = self.ca.issue("lightmail-client")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        conf = directory / "redis.conf"
        conf.write_text(
            f"port 0\nbind 127.0.0.1\ntls-port {self.port}\n"
            f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {self.ca.ca_file}\n"
            "tls-auth-clients yes\nsave \"\"\nappendonly no\n"
            f"dir {directory}\nlogfile {directory / 'redis.log'}\n"
            "user default off\n"
            f"user {USER} on >{PASSWORD} {ACL}\n")
        self.process = subprocess.Popen([REDIS_SERVER, str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca.ca_file))
        context.load_cert_chain(*self.client)
        for _ in range(200):
            if self.process.poll() is not None:
                log = self.directory / "redis.log"
                raise AssertionError("redis-server did not start (does it have TLS?): "
                                     + (log.read_text() if log.exists() else ""))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(f"AUTH {USER} {PASSWORD}\r\nPING\r\n".encode())
                    answer = b""
                    while b"PONG" not in answer and (part := tls.recv(100)):
                        answer += part
                    if b"PONG" in answer:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server does not answer on {self.address}")

    def password_file(self, directory: Path) -> Path:
        path = directory / "redis.secret"
        path.write_text(PASSWORD + "\n")
        path.chmod(0o600)
        return path

    def cluster_section(self, directory: Path, *, ca_file: Path | None = None,
                        client: bool = True, user: str = USER,
                        password_file: Path | None = None, more: str = "") -> str:
        """The [cluster] lines of a configuration that reaches this Redis."""
        lines = [f"redis = {self.address}", f"redis_user = {user}",
                 f"redis_password_file = {password_file or self.password_file(directory)}",
                 "redis_tls = yes", f"redis_ca_file = {ca_file or self.ca.ca_file}",
                 "redis_timeout = 0.5s"]
        if client:
            lines += [f"redis_cert_file = {self.client[0]}",
                      f"redis_key_file = {self.client[1]}"]
        return "[cluster]\n" + "\n".join(lines) + "\n" + more

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
