"""Domains, users, aliases, recipient resolution and password login (all backends)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.cred.error import UnauthorizedLogin

from lightmail.directory.cred import login, make_portal
from lightmail.directory.interfaces import DirectoryError, IMailAccount
from lightmail.storage import schema as s


@pytest_twisted.inlineCallbacks
def test_domains_users_aliases_lifecycle(stack) -> None:
    d = stack.directory
    yield d.add_domain("Example.TEST.")
    yield d.add_domain("bücher.example")
    assert (yield d.list_domains()) == ["example.test", "xn--bcher-kva.example"]
    with pytest.raises(DirectoryError, match="exists already"):
        yield d.add_domain("example.test")
    with pytest.raises(DirectoryError, match="not a valid domain"):
        yield d.add_domain("bad..domain")
    bob = yield d.add_user("Bob@Example.test", "s3cret", quota_bytes=1024)
    assert bob.address == "bob@example.test" and bob.quota_bytes == 1024
    with pytest.raises(DirectoryError, match="no such domain"):
        yield d.add_user("x@nowhere.test", None)
    with pytest.raises(DirectoryError, match="recipient delimiter"):
        yield d.add_user("a+b@example.test", None)
    yield d.add_user("carol@example.test", None)
    users = yield d.list_users("example.test")
    assert [u.address for u in users] == ["bob@example.test", "carol@example.test"]
    yield d.add_alias("postmaster@example.test", "bob@example.test")
    yield d.add_alias("*@example.test", "carol@example.test")
    aliases = yield d.list_aliases()
    assert [(a.source, a.destination) for a in aliases] == [
        ("*@example.test", "carol@example.test"),
        ("postmaster@example.test", "bob@example.test")]
    assert (yield d.allowed_senders(bob)) == ["bob@example.test", "postmaster@example.test"]
    assert (yield d.remove_alias("*@example.test")) == 1
    with pytest.raises(DirectoryError, match="no such alias"):
        yield d.remove_alias("*@example.test")
    yield d.remove_user("carol@example.test")
    assert (yield d.get_user("carol@example.test")) is None
    yield d.remove_domain("example.test")
    assert (yield d.list_domains()) == ["xn--bcher-kva.example"]
    with stack.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.users)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(s.aliases)).scalar() == 0


@pytest_twisted.inlineCallbacks
def test_resolution_users_detail_aliases_catch_all_and_loops(stack) -> None:
    d = stack.directory
    yield d.add_domain("example.test")
    yield d.add_domain("other.test")
    bob = yield d.add_user("bob@example.test", None)
    carol = yield d.add_user("carol@other.test", None)
    yield d.add_alias("team@example.test", "bob@example.test")
    yield d.add_alias("team@example.test", "carol@other.test")
    yield d.add_alias("team@example.test", "dave@remote.example")
    yield d.add_alias("loop1@example.test", "loop2@example.test")
    yield d.add_alias("loop2@example.test", "loop1@example.test")

    r = yield d.resolve("Bob+Lists@EXAMPLE.test")
    assert [(t.user.id, t.detail) for t in r.local] == [(bob.id, "lists")]
    r = yield d.resolve("team@example.test")
    assert {t.user.id for t in r.local} == {bob.id, carol.id}
    assert r.remote == ("dave@remote.example",)
    r = yield d.resolve("nobody@example.test")
    assert r.is_local_domain and not r.deliverable
    r = yield d.resolve("someone@remote.example")
    assert not r.is_local_domain and r.remote == ("someone@remote.example",)
    r = yield d.resolve("loop1@example.test")   # a loop ends, delivering nowhere
    assert not r.deliverable
    yield d.add_alias("*@example.test", "bob@example.test")
    r = yield d.resolve("anything@example.test")
    assert [t.user.id for t in r.local] == [bob.id]
    r = yield d.resolve("not an address")
    assert not r.deliverable


@pytest_twisted.inlineCallbacks
def test_password_login_through_the_portal(stack) -> None:
    d = stack.directory
    yield d.add_domain("example.test")
    yield d.add_user("bob@example.test", "correct horse")
    yield d.add_user("nopass@example.test", None)
    portal = make_portal(d, stack.mailstore)
    account = yield login(portal, "BOB@example.test", "correct horse")
    assert IMailAccount.providedBy(account)
    assert account.user.address == "bob@example.test"
    for user, password in [("bob@example.test", "wrong"), ("ghost@example.test", "x"),
                           ("nopass@example.test", ""), ("not-an-address", "x")]:
        with pytest.raises(UnauthorizedLogin):
            yield login(portal, user, password)
    yield d.set_password("bob@example.test", "battery staple")
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "bob@example.test", "correct horse")
    assert (yield login(portal, "bob@example.test", "battery staple")).user.id
    with stack.db.engine.connect() as conn:
        stored = conn.execute(sa.select(s.users.c.password_hash).where(
            s.users.c.localpart == "bob")).scalar()
    assert stored.startswith("$argon2id$") and "battery" not in stored


@pytest_twisted.inlineCallbacks
def test_verified_passwords_are_remembered_until_changed(sqlite_stack, monkeypatch) -> None:
    from lightmail.directory import cred
    d = sqlite_stack.directory
    yield d.add_domain("example.test")
    yield d.add_user("bob@example.test", "correct horse")
    calls: list[str] = []
    real = cred.verify_password_async

    def counting(stored: Any, password: str) -> Any:
        calls.append(password)
        return real(stored, password)
    monkeypatch.setattr(cred, "verify_password_async", counting)
    portal = make_portal(d, sqlite_stack.mailstore, auth_cache_ttl=60)
    for _ in range(3):
        yield login(portal, "Bob@example.test", "correct horse")
    assert calls == ["correct horse"]                  # argon2 once, then the cache
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "bob@example.test", "wrong")
    assert calls[-1] == "wrong"                        # a wrong password is always checked
    yield d.set_password("bob@example.test", "battery staple")
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "bob@example.test", "correct horse")   # a new hash ends it
    for _ in range(2):
        yield login(portal, "bob@example.test", "battery staple")
    assert calls.count("battery staple") == 1
    checker = portal.checkers[cred.credentials.IUsernamePassword]
    checker.cache.clock = lambda: 1e12                 # long after the TTL
    yield login(portal, "bob@example.test", "battery staple")
    assert calls.count("battery staple") == 2


@pytest_twisted.inlineCallbacks
def test_resolutions_are_remembered_briefly_and_forgotten_on_changes(sqlite_stack,
                                                                     monkeypatch) -> None:
    from lightmail.directory import sql
    d = sqlite_stack.directory
    d.resolve_cache_ttl = 5.0
    yield d.add_domain("example.test")
    yield d.add_user("bob@example.test", None)
    queries = []
    real = sqlite_stack.db.read
    monkeypatch.setattr(sqlite_stack.db, "read",
                        lambda *a, **kw: queries.append(a) or real(*a, **kw))
    first = yield d.resolve("bob@example.test")
    assert (yield d.resolve("bob@example.test")) == first and len(queries) == 1
    assert not (yield d.resolve("carol@example.test")).deliverable      # remembered too
    yield d.resolve("carol@example.test")
    assert len(queries) == 2
    yield d.add_user("carol@example.test", None)       # a change forgets everything
    assert (yield d.resolve("carol@example.test")).deliverable
    assert len(queries) == 3
    now = sql.time.monotonic()
    monkeypatch.setattr(sql.time, "monotonic", lambda: now + 6)   # the TTL runs out
    yield d.resolve("carol@example.test")
    assert len(queries) == 4
    d.resolve_cache_ttl = 0                             # 0: never remembered
    d.forget_resolutions()
    yield d.resolve("carol@example.test")
    yield d.resolve("carol@example.test")
    assert len(queries) == 6
