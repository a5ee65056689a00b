"""The manhole: a Python prompt inside the running main process, over SSH.

twisted.conch's manhole (``manhole_ssh``, as ``twistd manhole`` builds it): an SSH
server whose shell is an interactive interpreter, with LightMail's running parts in
its namespace (``NAMESPACE_HELP``).  Logins: the public keys of ``[manhole]
authorized_keys``, or the users and argon2 password hashes of ``passwords_file``;
nobody without one of them.  The host key is made on first start (Ed25519, mode 0600)
where ``host_key`` says.  Telnet, only when ``telnet_endpoint`` is set, which the
configuration allows on loopback or a Unix socket only (lightmail.config).

Whatever is typed runs in the reactor's thread: a slow expression stops the whole
server while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import MultiService, Service
from twisted.conch import manhole, manhole_ssh, telnet
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.admin.endpoint import EndpointService
from lightmail.config import Config
from lightmail.directory.passwords import hash_password, verify_password
from lightmail.wiring import Services

NAMESPACE_HELP = """\
root: the LightMail service tree (LightMailService); application: twistd's, its parent
services: the wired Services; config: the Config
storage, mailstore, queue_store, blobs, directory: storage and the directory
queue: the queue runner; workers: the WorkerPool (None without workers)
metrics: this process's metrics (metrics.registry)"""

log = Logger(namespace="lightmail.manhole")


@implementer(IAuthorizedKeysDB)
class AuthorizedKeys:
    """The keys of an OpenSSH authorized_keys file, read at each login (so that an
    edit takes effect at once), whatever the user name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> Iterable[keys.Key]:
        try:
            with self.path.open("rb") as file:
                return list(readAuthorizedKeyFile(file, keys.Key.fromString))
        except OSError as exc:
            log.warn("manhole: cannot read {path}: {error}", path=str(self.path),
                     error=exc.strerror)
            return []


@implementer(ICredentialsChecker)
class PasswordFile:
    """NAME:ARGON2HASH lines, read at each login; verified in a thread."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def _hashes(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warn("manhole: cannot read {path}: {error}", path=str(self.path),
                     error=str(exc))
            return {}
        pairs = (line.strip().partition(":") for line in text.splitlines())
        return {name: hashed for name, sep, hashed in pairs if sep and name}

    def _verify(self, name: str, password: str) -> bool:
        # (In a thread: the file read and argon2 both.)  An unknown name is verified
        # against a dummy hash: timing tells nothing.
        return verify_password(self._hashes().get(name), password)

    @defer.inlineCallbacks
    def requestAvatarId(self, creds: Any) -> Any:
        name = creds.username.decode("utf-8", "replace")
        ok = yield threads.deferToThread(self._verify, name,
                                         creds.password.decode("utf-8", "replace"))
        if not ok:
            log.warn("manhole: password refused for {user}", user=name)
            raise error.UnauthorizedLogin()
        return creds.username


def password_line(name: str, password: str) -> str:
    """A line of passwords_file (``lightmail manhole-password``)."""
    return f"{name}:{hash_password(password)}"


class Session(manhole_ssh.TerminalSession):
    def eofReceived(self) -> None:
        # The client's input ended (ssh with its standard input at its end): the
        # session ends with ^D, exit() or the channel's close, as a shell's would.
        pass


@implementer(portal.IRealm)
class LoggingRealm(manhole_ssh.TerminalRealm):
    sessionFactory = Session

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        log.info("manhole: {user} logged in over SSH",
                 user=avatarId.decode("utf-8", "replace"))
        return super().requestAvatar(avatarId, mind, *interfaces)


@implementer(portal.IRealm)
class TelnetRealm:
    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if telnet.ITelnetProtocol not in interfaces:
            raise NotImplementedError()
        log.info("manhole: {user} logged in over telnet",
                 user=avatarId.decode("utf-8", "replace"))
        proto = telnet.TelnetBootstrapProtocol(insults.ServerProtocol,
                                               manhole.ColoredManhole, self.namespace)
        return telnet.ITelnetProtocol, proto, lambda: None


def host_key(path: Path) -> keys.Key:
    """The SSH host key at ``path``; made first if missing (Ed25519, mode 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        log.info("manhole: made the SSH host key {path}", path=str(path))
    return keys.Key.fromFile(str(path))


class ManholeService(MultiService):
    """The manhole's listeners, with ``root``'s parts in the namespace."""

    name = "manhole"

    def __init__(self, config: Config, root: MultiService, services: Services,
                 queue_runner: Service, workers: Any = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.config = config
        self.root = root
        self.namespace: dict[str, Any] = {
            "root": root, "services": services, "config": config,
            "storage": services.storage, "mailstore": services.mailstore,
            "queue_store": services.queue, "blobs": services.blobs,
            "directory": services.directory, "queue": queue_runner,
            "workers": workers, "metrics": services.metrics,
            "application": None, "__doc__": NAMESPACE_HELP,
        }
        section = config.manhole
        checkers: list[ICredentialsChecker] = []
        passwords = None
        if section.authorized_keys is not None:
            checkers.append(SSHPublicKeyChecker(AuthorizedKeys(section.authorized_keys)))
        if section.passwords_file is not None:
            passwords = PasswordFile(section.passwords_file)
            checkers.append(passwords)
        realm = LoggingRealm()
        realm.chainedProtocolFactory = self._interpreter  # type: ignore[assignment]
        self.ssh = manhole_ssh.ConchFactory(portal.Portal(realm, checkers))
        EndpointService("manhole-SSH", "manhole: SSH", section.endpoint, self.ssh,
                        on_failure).setServiceParent(self)
        if section.telnet_endpoint and passwords is not None:
            telnet_portal = portal.Portal(TelnetRealm(self.namespace), [passwords])
            factory = ServerFactory()
            factory.protocol = lambda: telnet.TelnetTransport(  # type: ignore[assignment]
                telnet.AuthenticatingTelnetProtocol, telnet_portal)
            EndpointService("manhole-telnet", "manhole: telnet",
                            section.telnet_endpoint, factory, on_failure).setServiceParent(self)

    def _interpreter(self) -> insults.ServerProtocol:
        return insults.ServerProtocol(manhole.ColoredManhole, self.namespace)

    def startService(self) -> None:
        key = host_key(self.config.manhole_host_key)
        # (ConchFactory declares bytes values; SSHFactory wants Key objects.)
        self.ssh.publicKeys = {key.sshType(): key.public()}  # type: ignore[dict-item]
        self.ssh.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]
        # Under twistd the root's parent is the application's service collection.
        self.namespace["application"] = self.root.parent
        super().startService()
