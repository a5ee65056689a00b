"""An LDAP account backend (``[backend:NAME] type = ldap``), through ldap3.

Users are entries found with a search filter (RFC 4515, ``%u``/``%n``/``%d`` escaped
when put in); their address, aliases, quota and enabled flag come from attributes the
configuration names.  A password is checked the way Dovecot's ``auth_bind`` does it,
by binding to the server as the user (RFC 4513 §5.1.3), never by reading a hash:

- ``auth = search``: find the entry with ``user_filter`` (as ``bind_dn`` or
  anonymously), then bind as its DN;
- ``auth = bind``: bind as ``user_dn`` with the name put in (escaped as an RDN value,
  RFC 4514), then read the entry as the user.

The server is asked from a thread pool (``ldappool.py``); a login that succeeded is
remembered for ``auth_cache_ttl`` as an HMAC of the password, and an entry found for
``lookup_cache_ttl``, so that a client's next connections and a message's next RCPTs
ask nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from zope.interface import implementer

from lightmail.address import AddressError, normalise_address
from lightmail.config import BackendConfig
from lightmail.directory.cred import VerifiedCache
from lightmail.directory.interfaces import Account, IAccountBackend
from lightmail.directory.ldappool import Found, LDAPPool

#: Where a failed search-then-bind binds instead, so that an unknown user costs the
#: same round trip to the server as a wrong password (the server says "invalid
#: credentials" for a DN that does not exist).
NOBODY_RDN = "cn=lightmail-no-such-user"


def substitute(template: str, address: str, escape: Callable[[str], str]) -> str:
    """``template`` with Dovecot's %u (the address), %n (local part), %d (domain) and
    %% put in, each value escaped with ``escape``."""
    local, _, domain = address.rpartition("@")
    values = {"u": address, "n": local, "d": domain, "%": "%"}
    out, i = [], 0
    while i < len(template):
        char = template[i]
        if char == "%" and i + 1 < len(template) and template[i + 1] in values:
            key = template[i + 1]
            out.append("%" if key == "%" else escape(values[key]))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


@implementer(IAccountBackend)
class LDAPBackend:
    log = Logger()

    def __init__(self, config: BackendConfig, pool: Optional[LDAPPool] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = config.name
        self.domains = config.domains
        self.pool = pool or LDAPPool(
            config.uri, starttls=config.starttls, ca_file=config.ca_file,
            timeout=config.timeout, size=config.pool_size, name=config.name,
            bind_dn=config.bind_dn, bind_password=config.bind_password)
        self.clock = clock
        self.attributes = [a for a in (config.mail_attribute, config.alias_attribute,
                                       config.quota_attribute, config.enabled_attribute) if a]
        self.enabled_values = {value.lower() for value in config.enabled_values}
        self._found: dict[tuple[str, str], tuple[float, Found]] = {}
        self.checker = LDAPPasswordChecker(self, VerifiedCache(config.auth_cache_ttl,
                                                               clock=clock))

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    # -- lookups ----------------------------------------------------------------------

    def find_user(self, address: str) -> Deferred[Optional[Account]]:
        return self.find_entry("user", address).addCallback(self._account_of)

    def find_recipient(self, address: str) -> Deferred[Optional[Account]]:
        return self.find_entry("recipient", address).addCallback(self._account_of)

    def find_entry(self, kind: str, address: str) -> Deferred[Optional[Found]]:
        """The one entry ``user_filter`` (kind "user") or ``recipient_filter`` finds
        for ``address``; None for none, or for more than one (logged: a directory
        that gives two entries one address is not to be guessed about)."""
        key = (kind, address)
        cached = self._found.get(key)
        if cached is not None and cached[0] > self.clock():
            return succeed(cached[1])
        template = self.config.user_filter if kind == "user" else \
            (self.config.recipient_filter or self.config.user_filter)
        search_filter = substitute(template, address, escape_filter_chars)

        def one(entries: list[Found]) -> Optional[Found]:
            if len(entries) > 1:
                self.log.warn("LDAP backend {backend}: {count} entries match {filter}; "
                              "none is used", backend=self.name, count=len(entries),
                              filter=search_filter)
                return None
            if not entries:
                return None
            if self.config.lookup_cache_ttl > 0:
                if len(self._found) > 10000:
                    self._found = {}
                self._found[key] = (self.clock() + self.config.lookup_cache_ttl, entries[0])
            return entries[0]
        return self.pool.search(self.config.base, search_filter,
                                self.attributes).addCallback(one)

    def account(self, entry: Found) -> Optional[Account]:
        """What the entry's attributes say (None without a usable address)."""
        attrs, config = entry.attributes, self.config

        def values(name: str) -> list[str]:
            return attrs.get(name.lower(), []) if name else []
        addresses = [a for a in map(_address, values(config.mail_attribute)) if a]
        if not addresses:
            self.log.warn("LDAP backend {backend}: {dn} has no usable {attribute}",
                          backend=self.name, dn=entry.dn, attribute=config.mail_attribute)
            return None
        aliases = tuple(a for a in map(_address, values(config.alias_attribute))
                        if a and a != addresses[0])
        quota = None
        for raw in values(config.quota_attribute)[:1]:
            try:
                quota = max(0, int(raw))
            except ValueError:
                self.log.warn("LDAP backend {backend}: {dn}'s {attribute} is not a "
                              "number of bytes: {value!r}; the default quota applies",
                              backend=self.name, dn=entry.dn,
                              attribute=config.quota_attribute, value=raw)
        enabled = not config.enabled_attribute or any(
            value.lower() in self.enabled_values
            for value in values(config.enabled_attribute))
        return Account(addresses[0], aliases, quota, enabled)

    def _account_of(self, entry: Optional[Found]) -> Optional[Account]:
        return None if entry is None else self.account(entry)


@implementer(ICredentialsChecker)
class LDAPPasswordChecker:
    """Checks a username/password by binding to the LDAP server as the user; the
    avatar id is the address from the entry's mail attribute."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, backend: LDAPBackend, cache: VerifiedCache) -> None:
        self.backend = backend
        self.cache = cache

    @inlineCallbacks
    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Any:
        username = _text(creds.username)
        password = _text(creds.password)
        address = _address(username)
        if address is None or not password:
            raise error.UnauthorizedLogin("authentication failed")
        remembered = self.cache.verified(address, password)
        if remembered is not None:
            return remembered
        config = self.backend.config
        if config.auth == "bind":
            dn = substitute(config.user_dn, address, escape_rdn)
            entry = yield self.backend.pool.bind(dn, password, self.backend.attributes)
        else:
            found = yield self.backend.find_entry("user", address)
            dn = found.dn if found is not None else f"{NOBODY_RDN},{config.base}"
            entry = yield self.backend.pool.bind(dn, password)
            entry = found if entry is not None else None
        account = self.backend.account(entry) if entry is not None else None
        if account is None or not account.enabled:
            raise error.UnauthorizedLogin("authentication failed")
        self.cache.remember(address, account.address, password)
        return account.address


def _address(raw: str) -> Optional[str]:
    try:
        return normalise_address(raw)
    except AddressError:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
