"""Real content scanners for tests, each private to a temporary directory, and fakes
that misbehave.

* :class:`Clamd`: Debian's clamav-daemon (``clamd``), its clamd.conf written here
  (LocalSocket in the directory, Foreground), its DatabaseDirectory holding one
  signature made here, an .ndb body signature of the EICAR test string: no
  freshclam, no download.
* :class:`Rspamd`: Debian's rspamd with a local configuration (the packaged one,
  with ``LOCAL_CONFDIR`` pointing here): the normal and controller workers on free
  ports, the modules that look things up on the network off, DNS at a closed port,
  and the Bayes classifier on a private redis-server (Debian's) of its own.
* :class:`Spamd`: SpamAssassin's spamd (Debian's spamd) on a free port,
  ``--allow-tell``, its rules the packaged ones (no sa-update), no network tests.
* :class:`FakeScanner`: a Twisted server on a Unix socket or a free TCP port that
  hangs, answers garbage or closes in the middle of the request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from tests.harness import free_ports

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SIGNATURE = "LightMail-Test-EICAR"


def _program(name: str) -> str:
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{name}").exists()),
        None)
    if found is None:
        raise AssertionError(f"{name} is missing: run scripts/test-peers.sh")
    return found


class _Process:
    """A started program, its output in a file, stopped (and waited for) once."""

    proc: Optional[subprocess.Popen[bytes]] = None
    log: Path

    def _start(self, args: list[str], log: Path, **kwargs: Any) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, **kwargs)

    def _check_alive(self, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{what} exited ({self.proc.returncode}): "
                                 + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # Its own session (start_new_session): the group is this program's workers.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class Clamd(_Process):
    def __init__(self, root: Path, stream_max: str = "1M") -> None:
        self.root = root
        self.socket = root / "clamd.sock"
        self.address = f"unix:{self.socket}"
        db = root / "db"
        db.mkdir(parents=True, exist_ok=True)
        # An .ndb signature: NAME:TARGET(0, any file):OFFSET(* anywhere):HEX.
        (db / "lightmail-test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        self.conf = root / "clamd.conf"
        self.conf.write_text(
            f"LocalSocket {self.socket}\nForeground yes\nDatabaseDirectory {db}\n"
            f"TemporaryDirectory {root}\nPidFile {root / 'clamd.pid'}\n"
            f"StreamMaxLength {stream_max}\nLogFile {root / 'clamd.log'}\n"
            f"User {_user()}\n")

    def start(self) -> Clamd:
        self._start([_program("clamd"), "-c", str(self.conf)], self.root / "clamd.out")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            self._check_alive("clamd")
            if self.socket.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.connect(str(self.socket))
                        sock.sendall(b"zPING\0")
                        if sock.recv(16).startswith(b"PONG"):
                            return self
                except OSError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("clamd did not start within 90 s")


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def _http(url: str, data: Optional[bytes] = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Redis(_Process):
    def __init__(self, root: Path) -> None:
        self.root = root
        [self.port] = free_ports(1)

    def start(self) -> Redis:
        self._start([_program("redis-server"), "--port", str(self.port), "--bind",
                     "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                     str(self.root)], self.root / "redis.out")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive("redis-server")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("redis-server did not start within 30 s")


#: Modules of the packaged configuration that look things up on the network (DNS
#: lists, fuzzy storage, URL redirectors) or keep state in Redis; all off here.
RSPAMD_OFF = ("rbl", "surbl", "emails", "dkim", "dmarc", "spf", "arc", "asn",
              "fuzzy_check", "phishing", "url_redirector", "dcc", "hfilter", "neural",
              "ratelimit", "greylist", "replies", "reputation", "history_redis",
              "mx_check", "once_received", "whitelist", "rspamd_update", "dkim_signing",
              "elastic", "clickhouse", "metadata_exporter", "p0f", "antivirus",
              "external_services", "bimi")


class Rspamd(_Process):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = Redis(root)
        self.port, self.controller_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.controller_url = f"http://127.0.0.1:{self.controller_port}"
        local = root / "local.d"
        override = root / "override.d"
        for folder in (local, override, root / "run", root / "db", root / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        (override / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.controller_port}";\ncount = 1;\n')
        (override / "worker-proxy.inc").write_text("enabled = false;\n")
        redis = f'servers = "127.0.0.1:{self.redis.port}";\n'
        (local / "redis.conf").write_text(redis)
        (local / "classifier-bayes.conf").write_text(
            f'backend = "redis";\n{redis}autolearn = false;\n')
        (local / "options.inc").write_text(
            'disable_hyperscan = true;\n'
            'dns { nameserver = ["127.0.0.1:9"]; timeout = 0.3s; retransmits = 1; }\n')
        (override / "logging.inc").write_text(
            f'type = "file";\nfilename = "{root / "log" / "rspamd.log"}";\n'
            'level = "info";\n')
        for module in RSPAMD_OFF:
            (local / f"{module}.conf").write_text("enabled = false;\n")

    def start(self) -> Rspamd:
        self.redis.start()
        user = _user()
        self._start([_program("rspamd"), "-f", "-u", user, "-g", user, "-i", "-c",
                     "/etc/rspamd/rspamd.conf",
                     "--var", f"LOCAL_CONFDIR={self.root}",
                     "--var", f"RUNDIR={self.root / 'run'}",
                     "--var", f"DBDIR={self.root / 'db'}",
                     "--var", f"LOGDIR={self.root / 'log'}"],
                    self.root / "rspamd.out")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self._check_alive("rspamd")
            try:
                if (_http(f"{self.url}/ping", timeout=2)[0] == 200
                        and _http(f"{self.controller_url}/ping", timeout=2)[0] == 200):
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("rspamd did not start within 120 s: "
                             + (self.root / "log" / "rspamd.log").read_text(
                                 errors="replace")[-3000:])

    def stat(self) -> dict[str, Any]:
        """The controller's /stat (what rspamc stat shows)."""
        code, body = _http(f"{self.controller_url}/stat")
        assert code == 200, body
        return dict(json.loads(body))

    def stop(self) -> None:
        super().stop()
        self.redis.stop()


class Spamd(_Process):
    def __init__(self, root: Path) -> None:
        # Its own site configuration: the packaged plugin list (.pre files) and ours,
        # in a directory the user spamd becomes (nobody, when run as root) can reach
        # and write: pytest's temporary directories are private to their owner.
        root = self.root = Path(tempfile.mkdtemp(prefix="lightmail-spamd-"))
        [self.port] = free_ports(1)
        self.address = f"tcp:127.0.0.1:{self.port}"
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, root / pre.name)
        (root / "local.cf").write_text(
            "use_bayes 1\nbayes_auto_learn 0\nskip_rbl_checks 1\ndns_available no\n"
            f"bayes_path {root / 'bayes'}\nbayes_file_mode 0666\n")
        root.chmod(0o777)

    def start(self) -> Spamd:
        user = ["-u", "nobody"] if os.getuid() == 0 else []
        self._start([_program("spamd"), "--listen", f"127.0.0.1:{self.port}",
                     "--allowed-ips", "127.0.0.1", "--allow-tell", "--max-children", "1",
                     "--min-children", "1", "--siteconfigpath", str(self.root),
                     "--nouser-config", "--syslog", "stderr", "--local",
                     "--pidfile", str(self.root / "spamd.pid"), *user],
                    self.root / "spamd.out")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self._check_alive("spamd")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                    if b"PONG" in sock.recv(64):
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("spamd did not start within 120 s")

    def learned(self) -> dict[str, int]:
        """nspam and nham of its Bayes database (sa-learn --dump magic)."""
        done = subprocess.run([_program("sa-learn"), "--siteconfigpath", str(self.root),
                               "--dump", "magic"], capture_output=True, text=True,
                              timeout=60)
        counts = {}
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[-1] in ("nspam", "nham"):
                counts[parts[-1]] = int(parts[2])
        return counts

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- fakes ----------------------------------------------------------------------------

class _Misbehaving(Protocol):
    def __init__(self, fake: FakeScanner) -> None:
        self.fake = fake
        self.seen = 0

    def connectionMade(self) -> None:
        self.fake.connections += 1
        self.fake.open.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.fake.open:
            self.fake.open.remove(self)

    def dataReceived(self, data: bytes) -> None:
        self.seen += len(data)
        mode = self.fake.mode
        if mode == "hang":
            return
        if mode == "close" and self.seen >= self.fake.close_after:
            self.transport.abortConnection()        # type: ignore[union-attr]
        elif mode == "garbage" and self.seen >= self.fake.close_after:
            self.transport.write(self.fake.garbage)  # type: ignore[union-attr]
            self.transport.loseConnection()           # type: ignore[union-attr]


class FakeScanner:
    """A scanner that misbehaves: ``hang`` reads and never answers; ``garbage``
    answers ``garbage`` once it has ``close_after`` octets; ``close`` drops the
    connection then, without a word.  On a Unix socket (``unix=True``) or a TCP port."""

    def __init__(self, mode: str, root: Path, unix: bool = True,
                 garbage: bytes = b"I am not clamd\0", close_after: int = 20) -> None:
        self.mode = mode
        self.garbage = garbage
        self.close_after = close_after
        self.connections = 0
        self.open: list[_Misbehaving] = []
        factory = Factory.forProtocol(lambda: _Misbehaving(self))  # type: ignore[arg-type]
        if unix:
            path = root / f"fake-{mode}.sock"
            self.port = reactor.listenUNIX(str(path), factory)  # type: ignore[attr-defined]
            self.address = f"unix:{path}"
        else:
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.address = f"tcp:127.0.0.1:{self.port.getHost().port}"
        self.url = f"http://127.0.0.1:{self.port.getHost().port}" if not unix else ""

    def stop(self) -> Any:
        for protocol in list(self.open):
            protocol.transport.abortConnection()   # type: ignore[union-attr]
        return self.port.stopListening()
