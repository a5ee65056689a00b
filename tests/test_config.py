"""The config file: defaults, types, and errors that name file, line and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightmail.config import Config, ConfigError, load_config, parse_config, reference_text
from lightmail.service import validate

REPO = Path(__file__).resolve().parent.parent


def error_of(text: str, path: str = "/etc/lm.conf", validators=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, validators)
    return info.value


def test_empty_file_gives_all_defaults() -> None:
    config = parse_config("", "/etc/lightmail/lightmail.conf")
    assert config.storage.sql_threads == 0        # chosen by backend (Database)
    assert config.logging.format == "text"
    assert config.listeners == ()
    assert config.database_url == "sqlite:////var/lib/lightmail/lightmail.db"
    assert config.blob_dir == Path("/var/lib/lightmail/blobs")


def test_types_are_parsed() -> None:
    config = parse_config(
        "[server]\nstate_dir = state\nshutdown_timeout = 2m\n"
        "[storage]\nsql_threads = 3\nauto_upgrade = no\nblob_gc_grace = 90s\n"
        "[directory]\ndefault_quota = 2G\n", "/srv/mail/etc/lm.conf")
    assert config.server.state_dir == Path("/srv/mail/etc/state")  # relative to the file
    assert config.server.shutdown_timeout == 120.0
    assert config.storage.sql_threads == 3
    assert config.storage.auto_upgrade is False
    assert config.storage.blob_gc_grace == 90.0
    assert config.directory.default_quota == 2 * 1024**3


def test_unknown_key_names_file_line_and_key() -> None:
    err = error_of("[server]\nhostname = a.example\n\n[storage]\nsql_thread = 4\n")
    assert (err.path, err.line, err.section, err.key) == ("/etc/lm.conf", 5, "storage",
                                                          "sql_thread")
    assert str(err) == ("/etc/lm.conf:5: [storage] sql_thread: unknown key 'sql_thread'; "
                        "did you mean 'sql_threads'?")


def test_bad_value_is_one_line_with_the_reason() -> None:
    err = error_of("# comment\n[storage]\nsql_threads = many\n")
    assert str(err) == ("/etc/lm.conf:3: [storage] sql_threads: expected a whole number, "
                        "got 'many'")
    assert "\n" not in str(err)


@pytest.mark.parametrize("text, line, needle", [
    ("[storage]\nio_threads = 0\n", 2, "must be at least 1"),
    ("[storage]\nsql_threads = 1000\n", 2, "must be at most 64"),
    ("[logging]\nformat = xml\n", 2, "expected one of text, json"),
    ("[storage]\nauto_upgrade = perhaps\n", 2, "expected yes or no"),
    ("[directory]\ndefault_quota = lots\n", 2, "expected a size"),
    ("[server]\nshutdown_timeout = soon\n", 2, "expected a duration"),
    ("[bogus]\nkey = 1\n", 1, "unknown section"),
    ("hostname = x\n", 1, "before any [section]"),
    ("[server]\nhostname = a\nhostname = b\n", 3, "appears twice"),
    ("[server]\n[server]\n", 2, "section appears twice"),
    ("[server]\nnot a key value line\n", 2, "cannot read line"),
    ("[listener:x]\nendpoint = tcp:25\n", 1, "needs 'protocol'"),
    ("[listener:x]\nprotocol = smtp\nendpoint = tcp:25\ntls = implicit\n", 4,
     "needs 'tls_cert'"),
])
def test_each_kind_of_error_is_located(text: str, line: int, needle: str) -> None:
    err = error_of(text)
    assert err.line == line, str(err)
    assert needle in str(err)


def test_validation_against_the_code(tmp_path: Path) -> None:
    path = tmp_path / "lm.conf"
    path.write_text("[storage]\nurl = oracle://db/mail\n")
    with pytest.raises(ConfigError, match=r"lm.conf:2: \[storage\] url: unsupported"):
        load_config(path, validators=validate)
    path.write_text("[listener:a]\nprotocol = gopher\nendpoint = tcp:0\n")
    with pytest.raises(ConfigError, match=r"lm.conf:2: \[listener:a\] protocol: unknown"):
        load_config(path, validators=validate)
    path.write_text("[listener:a]\nprotocol = smtp\nendpoint = carrier-pigeon:1\n")
    with pytest.raises(ConfigError, match=r"lm.conf:3: \[listener:a\] endpoint: not a usable"):
        load_config(path, validators=validate)
    path.write_text("[listener:a]\nprotocol = smtp\nendpoint = tcp:0\ntls = starttls\n"
                    "tls_cert = missing.pem\ntls_key = missing.key\n")
    with pytest.raises(ConfigError, match=r"lm.conf:5: \[listener:a\] tls_cert: no such file"):
        load_config(path, validators=validate)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.conf")


def test_shipped_example_config_is_valid() -> None:
    config = load_config(REPO / "etc" / "lightmail.conf")
    assert isinstance(config, Config)
    assert {listener.name for listener in config.listeners} >= {"mx", "submission"}
    assert config.server.state_dir == REPO / "var"


def test_reference_documents_every_key_and_is_current() -> None:
    text = reference_text()
    for key in ("sql_threads", "auto_upgrade", "recipient_delimiter", "shutdown_timeout",
                "max_connections_per_ip", "tls_cert"):
        assert f"``{key}``" in text
    shipped = (REPO / "docs" / "configuration.rst").read_text()
    assert shipped == text, "docs/configuration.rst is stale: run " \
        "`lightmail config-reference > docs/configuration.rst`"


def test_unix_socket_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = parse_config(
        "[listener:lmtp]\nprotocol = lmtp\nendpoint = unix:../var/lmtp.sock:mode=660\n"
        "[listener:abs]\nprotocol = lmtp\nendpoint = unix:address=/run/l.sock\n"
        "[pop3]\nexpire = 30\n", str(tmp_path / "etc" / "lightmail.conf"))
    assert config.listeners[0].endpoint == f"unix:{tmp_path / 'var' / 'lmtp.sock'}:mode=660"
    assert config.listeners[1].endpoint == "unix:address=/run/l.sock"
    assert config.pop3.expire == "30"
    with pytest.raises(ConfigError, match=r"\[pop3\] expire: expected NEVER or a number"):
        parse_config("[pop3]\nexpire = soon\n", "x.conf")


def test_transport_sections() -> None:
    config = parse_config("[transport:.Example.com]\nrelay = [smarthost]:587\ntls = encrypt\n"
                          "[transport:dovecot.test]\nprotocol = lmtp\nrelay = [::1]:24\n",
                          "x.conf")
    assert [(t.domain, t.relay, t.protocol, t.tls) for t in config.transports] == [
        (".example.com", "[smarthost]:587", "smtp", "encrypt"),
        ("dovecot.test", "[::1]:24", "lmtp", "may")]
    with pytest.raises(ConfigError, match=r"x.conf:2: \[transport:d\] relay: protocol = lmtp"):
        parse_config("[transport:d]\nprotocol = lmtp\n", "x.conf")


def test_the_readme_config_error_example_is_what_lightmail_says() -> None:
    """README.rst shows the error for ``sql_threads = lots`` in the demo config."""
    readme = (REPO / "README.rst").read_text()
    shown = re.search(r"^    (etc/lightmail\.conf:\d+: \[storage\] sql_threads: .*)$",
                      readme, re.M)
    assert shown is not None
    demo = (REPO / "etc" / "lightmail.conf").read_text()
    bad = re.sub(r"^sql_threads = .*$", "sql_threads = lots", demo, flags=re.M)
    with pytest.raises(ConfigError) as info:
        parse_config(bad, "etc/lightmail.conf")
    assert str(info.value) == shown.group(1)
