"""A private Dovecot instance for tests and benchmarks (Debian's dovecot-* packages).

Each instance has its own config, ``base_dir`` (sockets, pid), ``state_dir``, log file,
passwd-file and Maildirs under one temporary directory, and runs in the foreground
(``dovecot -F -c CONFIG``) as a child process in a process group of its own, so that
``stop()`` can take down every process it forked.  It serves LMTP (TCP and a unix
socket), POP3 and IMAP on loopback ports picked free beforehand (Dovecot cannot
listen on port 0 and report the port), without TLS and with cleartext logins allowed.

Users are virtual (a passwd-file with ``{PLAIN}`` passwords) and all own their mail
with one uid/gid:

* run as root, Dovecot drops privileges as it does in production (login processes as
  ``dovenull``, internal ones as ``dovecot``) and the mail belongs to ``nobody``:
  Dovecot refuses mail access as uid 0 whatever ``first_valid_uid`` says ("Mail access
  not allowed for root"), and root reads and removes the files anyway;
* run as any other user, everything runs as that user, who also owns the mail: no
  chroot, and the internal and login users are the caller (Dovecot's "rootless"
  set-up).

The configuration syntax changed in Dovecot 2.4; ``dovecot --version`` decides which
one is written.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from harness import free_ports

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
MODULES = Path("/usr/lib/dovecot")


def require_dovecot() -> None:
    missing = [str(path) for path in (Path(DOVECOT), MODULES / "lmtp", MODULES / "pop3",
                                      MODULES / "imap") if not os.access(path, os.X_OK)]
    if missing:
        raise AssertionError(f"Dovecot is not installed ({', '.join(missing)} missing): "
                             "run scripts/test-peers.sh (part of `make test`)")


def dovecot_version() -> tuple[int, ...]:
    """The installed Dovecot's version, e.g. (2, 3, 19, 1)."""
    require_dovecot()
    out = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    match = re.match(r"\s*(\d+(?:\.\d+)*)", out)
    if not match:
        raise AssertionError(f"cannot read the version in `dovecot --version`: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


class DovecotInstance:
    """A private Dovecot: LMTP, POP3 and IMAP on 127.0.0.1, users in a passwd-file.

    ``base`` is ignored (Dovecot's unprivileged processes must reach the directory, and
    pytest's tmp_path is private to root); the instance makes its own.  ``settings``
    adds or overrides top-level dovecot.conf settings (in the installed version's
    syntax); ``services`` is extra raw configuration appended at the end.
    """

    def __init__(self, base: Path | None = None, *, lmtp_port: int | None = None,
                 pop3_port: int | None = None, imap_port: int | None = None,
                 settings: dict[str, str] | None = None, services: str = "") -> None:
        require_dovecot()
        del base
        self.version = dovecot_version()
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-dovecot-"))
        os.chmod(self.base, 0o755)
        self.run_dir = self.base / "run"          # base_dir: sockets, master.pid
        self.state_dir = self.base / "state"
        self.mail_dir = self.base / "mail"
        for path in (self.run_dir, self.state_dir, self.mail_dir):
            path.mkdir(mode=0o755)
        self.config = self.base / "dovecot.conf"
        self.passwd = self.base / "passwd"
        self.passwd.touch(mode=0o644)
        self.log_path = self.base / "dovecot.log"
        spare = free_ports(3)
        self.lmtp_port = lmtp_port or spare[0]
        self.pop3_port = pop3_port or spare[1]
        self.imap_port = imap_port or spare[2]
        self.lmtp_socket = self.base / "lmtp.sock"
        if os.getuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
            os.chown(self.mail_dir, self.uid, self.gid)
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.users: dict[str, str] = {}
        self.config.write_text(self._config(settings or {}) + services)
        self._out = (self.base / "dovecot.out").open("w")
        self.proc: subprocess.Popen[bytes] | None = None

    # --- configuration ---------------------------------------------------------------

    @property
    def v24(self) -> bool:
        return self.version >= (2, 4)

    def _config(self, extra: dict[str, str]) -> str:
        root = os.getuid() == 0
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        settings: dict[str, str] = {}
        if self.v24:
            # Must come first: the syntax and storage defaults this file is written for.
            settings["dovecot_config_version"] = "2.4.0"
            settings["dovecot_storage_version"] = "2.4.0"
        settings.update({
            "base_dir": str(self.run_dir),
            "state_dir": str(self.state_dir),
            "instance_name": f"lightmail-test-{self.base.name}",
            "log_path": str(self.log_path),
            "info_log_path": str(self.log_path),
            "protocols": "lmtp pop3 imap",
            "listen": "127.0.0.1",
            "ssl": "no",
            "auth_mechanisms": "plain login",
            "first_valid_uid": str(self.uid),
            "first_valid_gid": str(self.gid),
            "mail_uid": str(self.uid),
            "mail_gid": str(self.gid),
            "postmaster_address": "postmaster@dovecot.test",
            "hostname": "dovecot.test",
        })
        maildir = str(self.mail_dir)
        if self.v24:
            settings["auth_allow_cleartext"] = "yes"
            settings["mail_driver"] = "maildir"
            settings["mail_path"] = f"{maildir}/%{{user|domain}}/%{{user|username}}/Maildir"
        else:
            settings["disable_plaintext_auth"] = "no"
            settings["mail_location"] = f"maildir:{maildir}/%d/%n/Maildir"
        if not root:
            settings["default_login_user"] = user
            settings["default_internal_user"] = user
            settings["default_internal_group"] = group
        settings.update(extra)
        lines = [f"{key} = {value}" for key, value in settings.items()]
        if self.v24:
            lines += ["passdb passwd-file {", f"  passwd_file_path = {self.passwd}", "}",
                      "userdb passwd-file {", f"  passwd_file_path = {self.passwd}", "}"]
        else:
            lines += ["passdb {", "  driver = passwd-file", f"  args = {self.passwd}", "}",
                      "userdb {", "  driver = passwd-file", f"  args = {self.passwd}", "}"]
        lines += [
            "service lmtp {",
            f"  inet_listener lmtp {{\n    port = {self.lmtp_port}\n  }}",
            f"  unix_listener {self.lmtp_socket} {{\n    mode = 0666\n  }}",
            "}",
            "service pop3-login {",
            f"  inet_listener pop3 {{\n    port = {self.pop3_port}\n  }}",
            "  inet_listener pop3s {\n    port = 0\n  }",
            "}",
            "service imap-login {",
            f"  inet_listener imap {{\n    port = {self.imap_port}\n  }}",
            "  inet_listener imaps {\n    port = 0\n  }",
            "}",
        ]
        if not root:
            # Rootless: nobody to chroot or to switch to.
            lines += ["service anvil {\n  chroot =\n}",
                      "service pop3-login {\n  chroot =\n}",
                      "service imap-login {\n  chroot =\n}",
                      "service auth-worker {\n  user = $default_internal_user\n}"]
        return "\n".join(lines) + "\n"

    # --- users and mail --------------------------------------------------------------

    def add_user(self, address: str, password: str, scheme: str = "PLAIN") -> None:
        """Add a virtual user (read at the next lookup: no restart needed).

        The password is stored as ``{PLAIN}password``, or hashed with another of
        Dovecot's schemes (``doveadm pw -s SCHEME``), e.g. ARGON2ID to make a login cost
        what it costs LightMail, which keeps argon2id hashes.
        """
        if ":" in address or ":" in password or "\n" in address + password:
            raise ValueError("':' and newlines cannot appear in a passwd-file entry")
        if scheme.upper() == "PLAIN":
            stored = f"{{PLAIN}}{password}"
        else:
            stored = subprocess.run(
                [DOVEADM, "-c", str(self.config), "pw", "-s", scheme, "-p", password],
                capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        local, _, domain = address.partition("@")
        home = self.mail_dir / domain / local
        self.users[address] = password
        # user:password:uid:gid:(gecos):home:(shell):extra fields; uid and gid come
        # from mail_uid/mail_gid.
        with self.passwd.open("a") as out:
            out.write(f"{address}:{stored}:::{home}::\n")

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail_dir / domain / local / "Maildir"

    def messages(self, address: str) -> list[Path]:
        """The message files in the user's INBOX (new/ and cur/)."""
        box = self.maildir(address)
        return sorted(path for sub in ("new", "cur") if (box / sub).is_dir()
                      for path in (box / sub).iterdir() if path.is_file())

    def count(self, address: str) -> int:
        """How many messages the user's INBOX holds (delivered, not yet expunged)."""
        return len(self.messages(address))

    # --- process ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        check = subprocess.run([DOVECOT, "-c", str(self.config), "-n"],
                               capture_output=True, text=True, timeout=60)
        if check.returncode:
            raise AssertionError(f"dovecot config check failed:\n{check.stderr}\n"
                                 f"{self.config.read_text()}")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        waiting: list[object] = [self.lmtp_port, self.pop3_port, self.imap_port,
                                 self.lmtp_socket]
        while waiting and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._accepts(waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(0.05)
        if waiting:
            self.stop(remove=False)
            raise AssertionError(f"Dovecot did not start (still waiting for {waiting}):\n"
                                 f"{self.logtext()}")

    @staticmethod
    def _accepts(where: object) -> bool:
        try:
            if isinstance(where, int):
                with socket.create_connection(("127.0.0.1", where), timeout=1):
                    return True
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(str(where))
                return True
        except OSError:
            return False

    def logtext(self) -> str:
        self._out.flush()
        text = ""
        for path in (self.base / "dovecot.out", self.log_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self, remove: bool = True) -> None:
        """Stop the master, then kill anything of its process group still alive."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            # The master stops its children, but a straggler (a login process, an
            # lmtp still writing) must not outlive the instance: kill the group and
            # wait until none of it runs.  (Orphans are reaped by init, which may be
            # slow in a container: a zombie counts as gone.)
            deadline = time.monotonic() + 10
            while group_members(self.proc.pid) and time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.wait(10)
            self.proc = None
        if remove:
            self._out.close()
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> DovecotInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
