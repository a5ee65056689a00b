"""A private PostgreSQL for tests of the database link (Debian's postgresql package: the
binaries under /usr/lib/postgresql/*/bin): ``initdb`` into a new directory, TLS on
with a server certificate of a test CA for 127.0.0.1, a free loopback port, and a
pg_hba.conf that lets ``lightmail`` in over TLS only (``hostssl``), with its password
(scram-sha-256) and a client certificate of the same CA (``clientcert=verify-ca``).

PostgreSQL refuses to run as root: under root (a container) the directory is given
to the ``postgres`` user and the server runs as it (setpriv).  The server runs in the
foreground as a child process and is killed by :meth:`stop`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from tests.harness import free_port
from tests.testca import TestCA

USER = "lightmail"
PASSWORD = "pg-link-secret"


def _bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise AssertionError("PostgreSQL's server binaries are missing (/usr/lib/postgresql/"
                             "*/bin/initdb): install Debian's postgresql package")
    return found[-1].parent


class TLSPostgres:
    """``port``; ``ca``: the CA of its certificate and of ``client`` (cert, key);
    ``url``: the database's URL, without a password."""

    def __init__(self, ca_directory: Path) -> None:
        binaries = _bin()
        self.ca = TestCA(ca_directory)
        self.client = self.ca.issue(USER)
        self.client[1].chmod(0o600)                 # libpq wants it so
        # Not under pytest's directory: a root-owned 0700 one the postgres user
        # could not enter.
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"
        data, run = self.base / "data", self.base / "run"
        secret = self.base / "initdb.pw"
        secret.write_text(PASSWORD + "\n")
        server_cert, server_key = self.ca.issue("db.test", ips=("127.0.0.1",))
        keys = self.base / "tls"
        keys.mkdir()
        for source, name in ((server_cert, "server.crt"), (server_key, "server.key"),
                             (self.ca.ca_file, "ca.crt")):
            shutil.copy(source, keys / name)
        (keys / "server.key").chmod(0o600)
        run.mkdir()
        as_user: list[str] = []
        if os.getuid() == 0:
            postgres = pwd.getpwnam("postgres")
            for path in (self.base, *self.base.rglob("*")):
                os.chown(path, postgres.pw_uid, postgres.pw_gid)
            as_user = ["setpriv", f"--reuid={postgres.pw_uid}",
                       f"--regid={postgres.pw_gid}", "--clear-groups"]
        self.process: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", USER,
                            f"--pwfile={secret}", "--auth-local=trust",
                            "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"],
                           check=True, capture_output=True)
            (data / "pg_hba.conf").write_text(
                "local all all trust\n"
                f"hostssl all {USER} 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n")
            self.process = subprocess.Popen(
                [*as_user, str(binaries / "postgres"), "-D", str(data),
                 "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={run}", "-c", "ssl=on",
                 "-c", f"ssl_cert_file={keys / 'server.crt'}",
                 "-c", f"ssl_key_file={keys / 'server.key'}",
                 "-c", f"ssl_ca_file={keys / 'ca.crt'}", "-c", "fsync=off",
                 "-c", "password_encryption=scram-sha-256"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._wait(binaries, run)
        except BaseException:
            self.stop()
            raise

    def _wait(self, binaries: Path, run: Path) -> None:
        assert self.process is not None
        for _ in range(300):
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(f"the test PostgreSQL did not start: {error}")
            ready = subprocess.run([str(binaries / "pg_isready"), "-q", "-h", str(run),
                                    "-p", str(self.port)], check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise AssertionError("the test PostgreSQL does not answer")

    def storage_section(self, directory: Path, *, ca_file: Path | None = None,
                        client: bool = True, tls: bool = True, more: str = "") -> str:
        """The [storage] lines of a configuration that reaches it."""
        secret = directory / "pg.secret"
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        lines = [f"url = {self.url}", f"password_file = {secret}"]
        if tls:
            lines += ["tls = yes", f"ca_file = {ca_file or self.ca.ca_file}"]
            if client:
                lines += [f"cert_file = {self.client[0]}", f"key_file = {self.client[1]}"]
        return "[storage]\n" + "\n".join(lines) + "\n" + more

    def admin_engine(self) -> sa.Engine:
        """An engine of its own (TLS, password, client certificate), to look behind
        LightMail's back."""
        return sa.create_engine(self.url, poolclass=sa.pool.NullPool, connect_args={
            "password": PASSWORD, "sslmode": "verify-full",
            "sslrootcert": str(self.ca.ca_file), "sslcert": str(self.client[0]),
            "sslkey": str(self.client[1])})

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(30)
            if self.process.stderr is not None:
                self.process.stderr.close()
        shutil.rmtree(self.base, ignore_errors=True)
