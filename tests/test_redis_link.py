"""The Redis link (lightmail.cluster.redislink) against a Redis of the test's own that
speaks TLS only, wants a client certificate and has an ACL user (tests/redispeer.py,
started once for the module): the cluster node and its subscription, the rate
limits, greylisting and the login guard all reach it with [cluster]'s user, password
and TLS; a CA that did not sign its certificate, a name it does not carry, a missing
client certificate and a wrong password are each refused and said once, with the
reason, and /readyz of a real server says Redis is down and why."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from lightmail.cluster.node import Node
from lightmail.config import ConfigError, parse_config
from lightmail.policy.limits import FallingBackBuckets
from lightmail.wiring import Role, make_failure_counts, make_limiter, shared_redis
from tests.harness import ServerProcess, wait_until
from tests.redispeer import PASSWORD, TLSRedis
from tests.testca import TestCA


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path_factory.mktemp("redis-tls"))
    try:
        yield server
    finally:
        server.stop()


def texts_of(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events]


def prefix() -> str:
    """A prefix of the test's own, among the keys the ACL user may touch."""
    return f"lightmail:t{uuid.uuid4().hex[:8]}:"


@pytest_twisted.ensureDeferred
async def test_every_redis_user_reaches_it_over_tls_as_the_acl_user(
        redis: TLSRedis, tmp_path: Path) -> None:
    config = parse_config(redis.cluster_section(tmp_path) + f"prefix = {prefix()}\n"
                          f"[limits]\nbackend = redis\nredis = {redis.address}\n"
                          f"[greylist]\nstore = redis\nredis = {redis.address}/1\n")
    assert PASSWORD not in repr(config)
    node = Node(config.cluster, "a")
    heard: list[bytes] = []
    node.listen(heard.append, lambda: None)
    node.startService()
    limiter = make_limiter(config)
    greylist = shared_redis(config, config.greylist.redis)
    counts = make_failure_counts(config, Role.SERVER)
    try:
        await wait_until(lambda: node.subscription is not None
                         and node.subscription.listening)
        # Its default user is off: whatever answers was asked as the ACL user.
        assert await node.check() == "ok"
        await node.ask("return redis.call('PUBLISH', KEYS[1], 'hello')", [node.channel], [])
        await wait_until(lambda: heard == [b"hello"])
        assert isinstance(limiter, FallingBackBuckets)
        assert [await limiter.take("k", 0.01, 1) for _ in range(2)][1] > 0
        assert not limiter.backend.down                     # Redis's buckets, not local
        assert await greylist.eval("return redis.call('PING')", [], []) == "PONG"
        assert [await counts.add("net:192.0.2.1") for _ in range(2)] == [1, 2]
    finally:
        await node.stopService()
        await limiter.primary.redis.disconnect()            # type: ignore[attr-defined]
        await greylist.disconnect()
        await counts.redis.disconnect()                     # type: ignore[attr-defined]


async def refused(config_text: str) -> tuple[str, Node]:
    node = Node(parse_config(config_text).cluster, "x")
    answer = await node.check()
    return answer, node


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused_and_said_once(
        redis: TLSRedis, tmp_path: Path) -> None:
    other = TestCA(tmp_path / "other", "Another CA")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    node = Node(parse_config(redis.cluster_section(tmp_path, ca_file=other.ca_file)).cluster,
                "x")
    try:
        answers = [await node.check() for _ in range(3)]
    finally:
        globalLogPublisher.removeObserver(events.append)
        await node.redis.disconnect()
    assert answers[0] == ("no answer within 0.5s (TLS handshake failed: certificate "
                          "verify failed)")
    warned = [t for t in texts_of(events) if "certificate verify failed" in t]
    assert warned == [f"Redis at {redis.address}: TLS handshake failed: certificate "
                      "verify failed"]
    assert not any(PASSWORD in t for t in texts_of(events))


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_refused(redis: TLSRedis,
                                                         tmp_path: Path) -> None:
    text = redis.cluster_section(tmp_path, more="redis_server_name = other.test\n")
    answer, node = await refused(text)
    await node.redis.disconnect()
    assert answer == ("no answer within 0.5s (TLS: the server's certificate is not for "
                      "'other.test')")
    # The name it does carry is accepted.
    answer, node = await refused(redis.cluster_section(
        tmp_path, more="redis_server_name = redis.test\n"))
    await node.redis.disconnect()
    assert answer == "ok"


@pytest_twisted.ensureDeferred
async def test_without_a_client_certificate_redis_refuses(redis: TLSRedis,
                                                          tmp_path: Path) -> None:
    answer, node = await refused(redis.cluster_section(tmp_path, client=False))
    await node.redis.disconnect()
    assert answer == ("no answer within 0.5s (TLS handshake failed: tlsv13 alert "
                      "certificate required)")


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_refused_and_never_shown(redis: TLSRedis,
                                                           tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password\n")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        answer, node = await refused(redis.cluster_section(tmp_path, password_file=wrong))
        await node.redis.disconnect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answer.startswith("no answer within 0.5s (could not auth: WRONGPASS"), answer
    assert not any("not-the-password" in t for t in texts_of(events))


def test_the_link_keys_are_checked_at_start_up(redis: TLSRedis, tmp_path: Path) -> None:
    other = TestCA(tmp_path / "other", "Another CA")
    _, other_key = other.issue("x")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    base = f"[cluster]\nredis = {redis.address}\nredis_tls = yes\n"
    for bad, message in (
            (f"redis_ca_file = {not_pem}", "holds no PEM certificate"),
            (f"redis_ca_file = {tmp_path / 'none.pem'}", "cannot read"),
            (f"redis_cert_file = {redis.client[0]}", "go together"),
            (f"redis_cert_file = {redis.client[0]}\nredis_key_file = {other_key}",
             "is not the key of the certificate")):
        with pytest.raises(ConfigError, match=message):
            parse_config(base + bad + "\n")
    with pytest.raises(ConfigError, match="needs redis_tls = yes"):
        parse_config(f"[cluster]\nredis = {redis.address}\nredis_server_name = a\n")
    # [limits] alone in a Redis: the link keys are its.
    config = parse_config(f"[cluster]\nredis_tls = yes\nredis_ca_file = {redis.ca.ca_file}\n"
                          "[limits]\nbackend = redis\n")
    assert config.cluster.redis_tls


def test_readyz_of_a_server_says_redis_is_down_and_why(redis: TLSRedis,
                                                       tmp_path: Path) -> None:
    import json
    import urllib.error
    import urllib.request
    other = TestCA(tmp_path / "other", "Another CA")
    results = {}
    for name, ca in (("good", redis.ca.ca_file), ("bad", other.ca_file)):
        state = tmp_path / name
        state.mkdir()
        config = state / "lightmail.conf"
        config.write_text(
            f"[server]\nstate_dir = {state}\nhostname = {name}.example.test\n"
            "shutdown_timeout = 5s\n"
            + redis.cluster_section(state, ca_file=ca) + f"prefix = {prefix()}\n"
            "[admin]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
        server = ServerProcess(config)
        try:
            server.ports(expected=1)
            admin = int(server.wait_for(r"admin listener on [^\s:]+:(?P<port>\d+)")[0]
                        .group("port"))
            if name == "bad":
                server.wait_for(r"Redis at .*: TLS handshake failed: certificate verify "
                                r"failed")
            for _ in range(100):      # the good one: until it has subscribed
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz",
                                                timeout=10) as answer:
                        results[name] = (answer.status, json.loads(answer.read()))
                except urllib.error.HTTPError as error:
                    results[name] = (error.code, json.loads(error.read()))
                if name == "bad" or results[name][0] == 200:
                    break
                time.sleep(0.1)
            assert PASSWORD not in server.output
        finally:
            server.kill()
    assert results["good"][0] == 200 and results["good"][1]["checks"]["redis"] == "ok"
    status, verdict = results["bad"]
    assert status == 503
    assert verdict["checks"]["redis"] == ("no answer within 0.5s (TLS handshake failed: "
                                          "certificate verify failed)")
