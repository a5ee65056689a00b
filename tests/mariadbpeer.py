"""A private MariaDB for tests of the database link (Debian's mariadb-server:
``mariadb-install-db`` into a new directory, ``mariadbd`` in the foreground): TLS
with a server certificate of a test CA for 127.0.0.1, a free loopback port, and a
user ``lightmail`` with a password that must come over TLS with a client
certificate of the same CA (``REQUIRE X509``).  Killed by :meth:`stop`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import free_port
from tests.testca import TestCA

USER = "lightmail"
PASSWORD = "mariadb-link-secret"
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"


class TLSMariaDB:
    """``ca``: the CA of its certificate and of ``client``; ``url``: its database's
    URL, without a password."""

    def __init__(self, ca_directory: Path) -> None:
        install = shutil.which("mariadb-install-db")
        if install is None or not os.access(MARIADBD, os.X_OK):
            raise AssertionError("MariaDB's server is missing (mariadbd, mariadb-install-db):"
                                 " install Debian's mariadb-server package")
        self.ca = TestCA(ca_directory)
        self.client = self.ca.issue(USER)
        cert, key = self.ca.issue("db.test", ips=("127.0.0.1",))
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-mariadb-"))
        self.port = free_port()
        self.socket = self.base / "mariadb.sock"
        self.url = f"mysql+pymysql://{USER}@127.0.0.1:{self.port}/lightmail"
        data = self.base / "data"
        # As root it runs as root (it asks to be told so); otherwise as its user.
        user = ["--user=root"] if os.getuid() == 0 else []
        self.process: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run([install, "--no-defaults", f"--datadir={data}", *user,
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True)
            self.process = subprocess.Popen(
                [MARIADBD, "--no-defaults", f"--datadir={data}", *user,
                 f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket}",
                 "--skip-name-resolve", f"--ssl-cert={cert}", f"--ssl-key={key}",
                 f"--ssl-ca={self.ca.ca_file}", "--innodb-buffer-pool-size=16M",
                 "--skip-log-bin", f"--pid-file={self.base / 'pid'}",
                 f"--log-error={self.base / 'error.log'}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait()
            self._sql("CREATE DATABASE lightmail; "
                      f"CREATE USER {USER}@'127.0.0.1' IDENTIFIED BY '{PASSWORD}' REQUIRE X509;"
                      f" GRANT ALL ON lightmail.* TO {USER}@'127.0.0.1';")
        except BaseException:
            self.stop()
            raise

    def _sql(self, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["mariadb", f"--socket={self.socket}", "-uroot", "-e", sql],
                              capture_output=True, text=True, check=False)

    def _wait(self) -> None:
        assert self.process is not None
        for _ in range(300):
            if self.process.poll() is not None:
                log = self.base / "error.log"
                raise AssertionError("the test MariaDB did not start: "
                                     + (log.read_text() if log.exists() else ""))
            if self._sql("SELECT 1").returncode == 0:
                return
            time.sleep(0.05)
        raise AssertionError("the test MariaDB does not answer")

    def storage_section(self, directory: Path, *, ca_file: Path | None = None,
                        client: bool = True) -> str:
        """The [storage] lines of a configuration that reaches it."""
        secret = directory / "mariadb.secret"
        secret.write_text(PASSWORD + "\n")
        lines = [f"url = {self.url}", f"password_file = {secret}", "tls = yes",
                 f"ca_file = {ca_file or self.ca.ca_file}"]
        if client:
            lines += [f"cert_file = {self.client[0]}", f"key_file = {self.client[1]}"]
        return "[storage]\n" + "\n".join(lines) + "\n"

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)
