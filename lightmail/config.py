"""LightMail configuration: one INI file, parsed, typed and validated up front.

Why INI: mail administrators know ``key = value`` files from Postfix and Dovecot,
Python reads them with the standard library, and every key sits on its own line so
that an error can name the line.  Each section is a frozen dataclass below; the field
metadata (type parser and help text) is the single source for validation, defaults and
``docs/configuration.rst`` (``lightmail config-reference`` prints it).

Relative paths are resolved against the directory that holds the config file, so the
same file works whatever the current directory of the process is.

Errors are :class:`ConfigError` and print as one line::

    etc/lightmail.conf:12: [storage] sql_threads: expected a whole number, got 'many'
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lightmail.address import AddressError, normalise_address

if TYPE_CHECKING:
    from lightmail.policy.dnsbl import Zone

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "DKIMConfig",
    "DKIMKeySpec",
    "DMARCConfig",
    "DatabaseLink",
    "ListenerConfig",
    "MilterConfig",
    "S3Config",
    "load_config",
    "parse_config",
    "reference_text",
]


class ConfigError(Exception):
    """A configuration problem, located by file, line, section and key."""

    def __init__(
        self,
        message: str,
        path: str = "<config>",
        line: int | None = None,
        section: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.section = section
        self.key = key

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = ""
        if self.section is not None:
            what = f" [{self.section}]"
            if self.key is not None:
                what += f" {self.key}"
        return f"{where}:{what}: {self.message}" if what else f"{where}: {self.message}"


class _BadValue(ValueError):
    """Raised by value parsers; the message completes 'expected ..., got ...'."""


# --- value parsers -----------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_str(raw: str, base: Path) -> str:
    return raw


def parse_optional_address(raw: str, base: Path) -> str:
    """An email address (normalised), or empty."""
    if not raw:
        return ""
    try:
        return normalise_address(raw)
    except AddressError as exc:
        raise _BadValue(f"not an email address: {raw!r} ({exc})") from None


def parse_bool(raw: str, base: Path) -> bool:
    low = raw.lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise _BadValue(f"expected yes or no, got {raw!r}")


def parse_int(minimum: int = 0, maximum: int | None = None) -> Callable[[str, Path], int]:
    def parse(raw: str, base: Path) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _BadValue(f"expected a whole number, got {raw!r}") from None
        _check_range(value, minimum, maximum, raw)
        return value

    parse.__doc__ = _range_doc("whole number", minimum, maximum)
    return parse


def parse_size(minimum: int = 0, maximum: int | None = None) -> Callable[[str, Path], int]:
    def parse(raw: str, base: Path) -> int:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise _BadValue(f"expected a size such as 512, 64K, 50M or 2G, got {raw!r}")
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        _check_range(value, minimum, maximum, raw)
        return value

    parse.__doc__ = _range_doc("size in bytes (K, M, G suffixes)", minimum, maximum)
    return parse


def parse_duration(minimum: float = 0.0) -> Callable[[str, Path], float]:
    def parse(raw: str, base: Path) -> float:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", raw)
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            raise _BadValue(f"expected a duration such as 30s, 5m, 4h or 5d, got {raw!r}")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        if value < minimum:
            raise _BadValue(f"must be at least {minimum:g} seconds, got {raw!r}")
        return value

    parse.__doc__ = "duration (ms, s, m, h, d suffixes; plain numbers are seconds)"
    return parse


def parse_float(minimum: float = 0.0) -> Callable[[str, Path], float]:
    def parse(raw: str, base: Path) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _BadValue(f"expected a number, got {raw!r}") from None
        if value < minimum:
            raise _BadValue(f"must be at least {minimum:g}, got {raw!r}")
        return value

    parse.__doc__ = f"number, at least {minimum:g}"
    return parse


def parse_ratio(raw: str, base: Path) -> float:
    """a number from 0 to 1"""
    try:
        value = float(raw)
    except ValueError:
        raise _BadValue(f"expected a number from 0 to 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise _BadValue(f"expected a number from 0 to 1, got {raw!r}")
    return value


def parse_percentage(raw: str, base: Path) -> float:
    """a percentage (90%) or a number from 0 to 1"""
    text = raw.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise _BadValue(f"expected a percentage such as 90%, got {raw!r}") from None
    if not 0.0 < value <= 1.0:
        raise _BadValue(f"expected a percentage from 1% to 100%, got {raw!r}")
    return value


class MemoryLimit(NamedTuple):
    """``[server] memory_limit``: ``kind`` none, size (``amount`` in bytes) or share
    (``amount`` a fraction of the cgroup's limit or the machine's memory)."""

    kind: str
    amount: float


def parse_memory_limit(raw: str, base: Path) -> MemoryLimit:
    """a size (700M, 2G), a percentage (80%) of the cgroup's limit or the machine's
    memory, or 0 for none"""
    text = raw.strip()
    if text in ("0", "none", "no", ""):
        return MemoryLimit("none", 0.0)
    if text.endswith("%"):
        return MemoryLimit("share", parse_percentage(text, base))
    return MemoryLimit("size", float(parse_size(minimum=1)(text, base)))


def parse_choice(*choices: str) -> Callable[[str, Path], str]:
    def parse(raw: str, base: Path) -> str:
        if raw.lower() not in choices:
            raise _BadValue(f"expected one of {', '.join(choices)}; got {raw!r}")
        return raw.lower()

    parse.__doc__ = "one of: " + ", ".join(choices)
    return parse


SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
                     "uucp", "cron", "authpriv", "ftp",
                     *(f"local{n}" for n in range(8)))


def parse_syslog_target(raw: str, base: Path) -> str:
    """unix:PATH, udp:HOST:PORT or tcp:HOST:PORT, or empty"""
    if not raw:
        return ""
    from lightmail.syslog5424 import parse_target
    try:
        parse_target(raw)
    except ValueError as exc:
        raise _BadValue(str(exc)) from None
    return raw


def parse_expire(raw: str, base: Path) -> str:
    """NEVER, or a whole number of days"""
    if raw.strip().upper() == "NEVER":
        return "NEVER"
    if raw.strip().isdigit():
        return str(int(raw))
    raise _BadValue(f"expected NEVER or a number of days, got {raw!r}")


def parse_endpoint(raw: str, base: Path) -> str:
    """Twisted strports description (a relative Unix socket path is relative to the
    config file's directory)"""
    kind, sep, rest = raw.strip().partition(":")
    if kind == "unix" and sep:
        first, colon, options = rest.partition(":")
        key = ""
        if first.startswith("address="):
            key, first = "address=", first[len("address="):]
        if first and not first.startswith("/"):
            first = str((base / first).resolve())
        return f"unix:{key}{first}{colon}{options}"
    return raw.strip()


def parse_path(raw: str, base: Path) -> Path:
    """path (relative paths are relative to the config file's directory)"""
    if not raw:
        raise _BadValue("expected a path, got an empty value")
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def parse_optional_path(raw: str, base: Path) -> Path | None:
    """path, or empty for none (relative to the config file's directory)"""
    return parse_path(raw, base) if raw else None


def parse_cert_pairs(raw: str, base: Path) -> tuple[tuple[Path, Path], ...]:
    """CERT:KEY pairs, comma-separated (relative to the config file's directory)"""
    pairs = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        cert, sep, key = item.partition(":")
        if not sep or not cert or not key:
            raise _BadValue(f"expected CERT:KEY pairs separated by commas, got {item!r}")
        pairs.append((parse_path(cert, base), parse_path(key, base)))
    return tuple(pairs)


def parse_list(raw: str, base: Path) -> tuple[str, ...]:
    """comma- or space-separated list"""
    return tuple(item for item in re.split(r"[\s,]+", raw) if item)


SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent",
                "\\Trash")


def parse_special_use(raw: str, base: Path) -> tuple[str, ...]:
    """comma-separated NAME:\\USE pairs (RFC 6154 uses)"""
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        name, sep, use = item.rpartition(":")
        if not sep or not name or use.lower() not in [u.lower() for u in SPECIAL_USES]:
            raise _BadValue(f"expected NAME:USE with USE one of {' '.join(SPECIAL_USES)}, "
                            f"got {item!r}")
    return items


@dataclass(frozen=True)
class DKIMKeySpec:
    """One ``DOMAIN:SELECTOR:KEYFILE`` entry of ``[dkim] keys``."""

    domain: str                 # lower case, A-labels
    selector: str
    path: Path
    text: str = field(default="", compare=False)    # as written (to find its line)


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def parse_dkim_keys(raw: str, base: Path) -> tuple[DKIMKeySpec, ...]:
    specs: list[DKIMKeySpec] = []
    for item in (part.strip() for part in re.split(r"[,\n]", raw)):
        if not item:
            continue
        domain, _, rest = item.partition(":")
        selector, _, keyfile = rest.partition(":")
        domain, selector, keyfile = domain.strip(), selector.strip(), keyfile.strip()
        if not (domain and selector and keyfile):
            raise _BadValue(f"expected DOMAIN:SELECTOR:KEYFILE entries separated by "
                            f"commas, got {item!r}")
        try:
            ascii_domain = domain.rstrip(".").lower().encode("idna").decode("ascii")
        except UnicodeError:
            ascii_domain = ""
        if not _DOMAIN_RE.fullmatch(ascii_domain):
            raise _BadValue(f"expected a domain name, got {domain!r} in {item!r}")
        if not _DOMAIN_RE.fullmatch(selector):
            raise _BadValue(f"expected a selector (letters, digits, '-' and '.'), got "
                            f"{selector!r} in {item!r}")
        spec = DKIMKeySpec(ascii_domain, selector, parse_path(keyfile, base), item)
        if any((s.domain, s.selector) == (spec.domain, spec.selector) for s in specs):
            raise _BadValue(f"selector {selector} of {domain} is given twice")
        specs.append(spec)
    return tuple(specs)


def parse_header_names(required: tuple[str, ...] = ()) -> Callable[[str, Path], tuple[str, ...]]:
    never = ("bcc", "comments", "dkim-signature", "keywords", "received", "resent-bcc",
             "return-path")

    def parse(raw: str, base: Path) -> tuple[str, ...]:
        names = tuple(name.lower() for name in parse_list(raw, base))
        for name in names:
            if not _FIELD_NAME_RE.fullmatch(name):
                raise _BadValue(f"expected header field names, got {name!r}")
            if name in never:
                raise _BadValue(f"{name} is never signed (it changes in transit)")
        for name in required:
            if name not in names:
                raise _BadValue(f"the list must include {name}")
        return names

    parse.__doc__ = "header field names, comma- or space-separated"
    return parse


def parse_choices(*choices: str) -> Callable[[str, Path], tuple[str, ...]]:
    def parse(raw: str, base: Path) -> tuple[str, ...]:
        values = tuple(value.lower() for value in parse_list(raw, base))
        for value in values:
            if value not in choices:
                raise _BadValue(f"expected some of {', '.join(choices)}; got {value!r}")
        return values

    parse.__doc__ = "some of: " + ", ".join(choices)
    return parse


def parse_networks(raw: str, base: Path) -> tuple[str, ...]:
    """IP addresses and networks (192.0.2.7, 2001:db8::/32), comma-separated"""
    import ipaddress
    items = parse_list(raw, base)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _BadValue(f"not an IP address or network: {item!r}") from None
    return items


def parse_scanner_address(raw: str, base: Path) -> str:
    """unix:/PATH or tcp:HOST:PORT"""
    from lightmail.policy.scanclient import parse_address
    try:
        parse_address(raw)
    except ValueError as exc:
        raise _BadValue(str(exc)) from None
    return raw.strip()


def parse_http_url(raw: str, base: Path) -> str:
    """an http:// or https:// URL"""
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", raw.strip()):
        raise _BadValue(f"expected an http:// or https:// URL, got {raw!r}")
    return raw.strip().rstrip("/")


SPAM_ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist",
                "no action")
SPAM_RESULTS = ("reject", "tempfail", "junk", "tag")


def parse_spam_actions(raw: str, base: Path) -> tuple[tuple[str, str], ...]:
    """ACTION:RESULT pairs separated by commas (ACTION one of the scanner's: reject, soft
    reject, rewrite subject, add header, greylist, no action; RESULT one of reject,
    tempfail, junk, tag); actions not named keep their default"""
    mapping = dict(SpamConfig.DEFAULT_ACTIONS)
    for item in raw.replace("\n", ",").split(","):
        if not item.strip():
            continue
        action, sep, result = item.rpartition(":")
        action = " ".join(action.lower().split())
        result = result.strip().lower()
        if not sep or action not in SPAM_ACTIONS:
            raise _BadValue(f"expected ACTION:RESULT with ACTION one of "
                            f"{', '.join(SPAM_ACTIONS)}; got {item.strip()!r}")
        if result not in SPAM_RESULTS:
            raise _BadValue(f"expected a result among {', '.join(SPAM_RESULTS)}; "
                            f"got {result!r}")
        mapping[action] = result
    return tuple(mapping.items())


SASL_MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1",
                   "SCRAM-SHA-1-PLUS", "OAUTHBEARER", "XOAUTH2", "CRAM-MD5")


def parse_mechanisms(raw: str, base: Path) -> tuple[str, ...]:
    values = tuple(value.upper() for value in parse_list(raw, base))
    for value in values:
        if value not in SASL_MECHANISMS:
            raise _BadValue(f"unknown SASL mechanism {value!r}; known: "
                            + ", ".join(SASL_MECHANISMS))
    if not values:
        raise _BadValue("at least one mechanism is needed")
    return values


parse_mechanisms.__doc__ = "some of: " + ", ".join(SASL_MECHANISMS)


def _check_range(value: int, minimum: int, maximum: int | None, raw: str) -> None:
    if value < minimum:
        raise _BadValue(f"must be at least {minimum}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise _BadValue(f"must be at most {maximum}, got {raw!r}")


def _range_doc(what: str, minimum: int, maximum: int | None) -> str:
    if maximum is None:
        return f"{what}, at least {minimum}"
    return f"{what}, {minimum} to {maximum}"


parse_str.__doc__ = "text"
parse_dkim_keys.__doc__ = ("DOMAIN:SELECTOR:KEYFILE entries, separated by commas or line "
                           "breaks (key files relative to the config file's directory)")
parse_bool.__doc__ = "yes or no"


def option(default: Any, parser: Callable[[str, Path], Any], help: str,
           shown_default: str | None = None) -> Any:
    """Declare one configuration key as a dataclass field."""
    return field(default=default, metadata={
        "parser": parser,
        "help": help,
        "shown_default": shown_default,
    })


# --- sections ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = option(
        "", parse_str,
        "Name this server uses in greetings and Received headers.",
        shown_default="the machine's fully qualified name")
    state_dir: Path = option(
        Path("/var/lib/lightmail"), parse_path,
        "Directory for the embedded database, message blobs and other state.")
    shutdown_timeout: float = option(
        30.0, parse_duration(minimum=0.0),
        "How long a SIGTERM waits for in-flight transactions before closing them.")
    node_id: str = option(
        "", parse_str,
        "Name of this node in the shared queue's leases and in the database's nodes "
        "table (at most 64 characters); unique per running process: a node refuses to "
        "start while another process with its name beats ([cluster] heartbeat).  A "
        "node that restarts takes back the deliveries its crashed run had leased.",
        shown_default="the machine's host name")
    postmaster: str = option(
        "", parse_optional_address,
        "Where mail to postmaster goes when the directory has no postmaster user or "
        "alias for a local domain: RCPT TO:<postmaster> and postmaster@ any local domain "
        "are always accepted (RFC 5321 §4.5.1).  It also gets, once, a notice of a "
        "bounce that could not be returned to its sender (a double bounce).  Empty: "
        "postmaster works only where the directory has one, and a double bounce is "
        "kept in the queue as dead (lightmail queue list --state dead).")
    workers: int = option(
        0, parse_int(0, 64),
        "Worker processes that serve the listeners' connections (SMTP, submission, "
        "LMTP, IMAP, POP3), so that sessions use every core; 0 serves them in the main "
        "process.  The main process keeps the queue, delivery and the limits that span "
        "processes (see docs/architecture.rst).  Needs a config file (twistd).")
    prefork: bool = option(
        True, parse_bool,
        "Under twistd, fork the worker processes and the writer process from the main "
        "process as it starts, before its reactor and threads, so that they share the "
        "memory of the code they all load (some 60 MB a process; lightmail/workers/"
        "prefork.py).  A process restarted after it ended is a new interpreter "
        "either way.  no: each starts as a new Python interpreter.")
    memory_limit: MemoryLimit = option(
        MemoryLimit("share", 0.8), parse_memory_limit,
        "The ceiling of the server's memory (the proportional size, Pss, of its "
        "processes, workers and writer included: a page they share counts once): "
        "above it new connections are refused (SMTP "
        "421 4.3.2, IMAP * BYE [UNAVAILABLE], POP3 -ERR [SYS/TEMP]) while the sessions "
        "open go on.  A size (700M, 2G), a percentage of the memory the server may use "
        "(its cgroup's memory.max or memory.limit_in_bytes when it has one, else the "
        "machine's MemTotal), or 0 for none.",
        shown_default="80%")
    memory_resume: float = option(
        0.9, parse_percentage,
        "Connections are accepted again once the memory in use is below this share "
        "of memory_limit (so that the server does not flap at the ceiling).",
        shown_default="90%")
    memory_check_interval: float = option(
        2.0, parse_duration(minimum=0.1),
        "How often the memory in use is measured (/proc/PID/smaps_rollup of each "
        "process).")
    memory_log_interval: float = option(
        600.0, parse_duration(minimum=0.0),
        "How often the memory in use is logged besides each change of state; 0: "
        "only the changes.")


@dataclass(frozen=True)
class StorageConfig:
    url: str = option(
        "", parse_str,
        "SQLAlchemy URL of the metadata database: sqlite:///PATH, "
        "postgresql+psycopg://USER@HOST[:PORT]/DB or mysql+pymysql://USER@HOST[:PORT]/DB "
        "(the password in password_file, not here).",
        shown_default="sqlite:///STATE_DIR/lightmail.db")
    password_file: Path | None = option(
        None, parse_optional_path,
        "File holding the password of the URL's user (its first line), read at "
        "start-up and never logged nor shown; PostgreSQL and MariaDB.  Empty: none "
        "(peer or certificate authentication, or a password in the URL, which is "
        "masked wherever LightMail shows the URL).")
    tls: bool = option(
        False, parse_bool,
        "Speak TLS to PostgreSQL or MariaDB, checking the server's certificate "
        "against ca_file and for the URL's host (PostgreSQL: sslmode=verify-full; "
        "MariaDB: ssl_verify_cert and ssl_verify_identity); a server without TLS is "
        "refused.  no: the drivers' defaults (psycopg, and PyMySQL from 1.2: TLS when "
        "the server offers it, its certificate unchecked).")
    ca_file: Path | None = option(
        None, parse_optional_path,
        "CA certificates (PEM) the database server's certificate must chain to; "
        "empty: the system's.  With tls.")
    cert_file: Path | None = option(
        None, parse_optional_path,
        "A client certificate (PEM) to show the database server (PostgreSQL's "
        "clientcert, MariaDB's REQUIRE X509), with key_file.  With tls; empty: none.")
    key_file: Path | None = option(
        None, parse_optional_path,
        "The private key (PEM) of cert_file; libpq wants it readable by its owner "
        "alone (mode 0600).")
    blob_dir: Path | None = option(
        None, parse_optional_path,
        "Directory of the content-addressed message blob store.",
        shown_default="STATE_DIR/blobs")
    sql_threads: int = option(
        0, parse_int(0, 64),
        "Size of the bounded thread pool that runs all SQL (and of the connection pool). "
        "0: 2 for SQLite (one writer at a time, reads from memory: more threads only "
        "contend for Python's interpreter lock, measured 10-20% slower with 8), 8 for "
        "PostgreSQL and MariaDB.")
    io_threads: int = option(
        4, parse_int(1, 64),
        "Size of the thread pool for blob file writes, fsyncs and reads.")
    blob_backend: str = option(
        "filesystem", parse_choice("filesystem", "s3"),
        "Where message blobs are kept: filesystem (blob_dir) or s3 (a bucket of any "
        "S3-compatible service, the [s3] section).  Chosen at start; 'lightmail blobs "
        "migrate' moves the blobs from one to the other.")
    blob_sync: str = option(
        "auto", parse_choice("auto", "fsync"),
        "How blobs are made durable.  auto: the blobs of one grouped SQL transaction "
        "(message acceptance, LMTP) are flushed together with one syncfs call where "
        "the kernel reports write-back errors through syncfs (Linux 5.8 and later), "
        "each blob alone with fsync elsewhere.  fsync: always each blob alone; "
        "choose it when the blob directory shares a filesystem with heavy unrelated "
        "writes, which a syncfs would wait for too.")
    blob_gc_grace: float = option(
        3600.0, parse_duration(minimum=0.0),
        "Unreferenced blobs and stray temporary files younger than this are kept "
        "by garbage collection (protects writes still in flight).")
    auto_upgrade: bool = option(
        True, parse_bool,
        "Apply pending schema migrations at start-up (otherwise run 'lightmail db upgrade').")
    writer_process: bool = option(
        True, parse_bool,
        "Make accepted mail durable in a process of its own (the writer process: blob "
        "flush and SQL commit of SMTP acceptance and LMTP delivery, grouped), so that "
        "the server's reactor and the commit do not take turns at Python's interpreter "
        "lock.  Used by a server started from a configuration file with [server] "
        "workers = 0; measured at 10 SMTP sessions, 1.6x the messages per second.  "
        "no: everything in the server's process.")
    sync_flag_changes: bool = option(
        False, parse_bool,
        "Put the commit of a flag change (STORE, the \\Seen a FETCH sets) and of an "
        "EXPUNGE (and POP3's deletions) on disk before answering it.  no (as Dovecot's "
        "mail_fsync = optimized): with SQLite it is answered once in the operating "
        "system's cache, so that a crash of LightMail, even kill -9, keeps it, and it "
        "reaches the disk with the next message filed (or the system's own write-back); a"
        " power loss may undo the last such changes, never a message.  Mail itself (SMTP,"
        " LMTP, APPEND, COPY, MOVE) is always on disk before it is answered.  PostgreSQL "
        "and MariaDB: always on disk (their own settings, such as synchronous_commit, "
        "decide).")
    #: Read from password_file by parse_config; never shown or logged.
    password: str = field(default="", repr=False, compare=False)


def parse_s3_endpoint(raw: str, base: Path) -> str:
    """http:// or https:// URL, or empty"""
    if raw and not re.fullmatch(r"https?://[^/\s]+/?", raw):
        raise _BadValue(f"expected http://HOST[:PORT] or https://HOST[:PORT], got {raw!r}")
    return raw.rstrip("/")


def parse_s3_prefix(raw: str, base: Path) -> str:
    """key prefix: empty, or ending in /"""
    if raw and (not raw.endswith("/") or raw.startswith("/")):
        raise _BadValue(f"expected a prefix such as lightmail/ (ending in /, not starting "
                        f"with one), got {raw!r}")
    return raw


@dataclass(frozen=True)
class S3Config:
    """The blob store on S3 ([storage] blob_backend = s3): any S3-compatible service
    (AWS S3, MinIO, Garage, Ceph's RADOS Gateway).  Blobs are objects named by the
    SHA-256 of their content, uploaded with that checksum for the server to verify."""

    endpoint: str = option(
        "", parse_s3_endpoint,
        "The service's URL (https://s3.example.net or http://127.0.0.1:9000); empty: "
        "AWS S3 of 'region'.")
    bucket: str = option("", parse_str, "The bucket (it must exist).")
    region: str = option("us-east-1", parse_str, "The region requests are signed for.")
    prefix: str = option(
        "", parse_s3_prefix,
        "Prepended to every key (lightmail/: the blobs are lightmail/ab/abcd...), so "
        "that one bucket can hold the blobs of several installations.")
    access_key: str = option("", parse_str, "The access key id.")
    secret_key_file: Path | None = option(
        None, parse_optional_path,
        "File holding the secret access key (its first line), read at start-up; the "
        "key is never logged.")
    secret_key: str = field(default="", repr=False, compare=False)  # never shown
    addressing: str = option(
        "path", parse_choice("path", "virtual"),
        "How the bucket is named in requests: path (http://HOST/BUCKET/KEY, what "
        "MinIO and most S3-compatible services expect) or virtual "
        "(http://BUCKET.HOST/KEY).")
    tls_verify: bool = option(
        True, parse_bool,
        "Check the service's TLS certificate (an https:// endpoint).")
    ca_file: Path | None = option(
        None, parse_optional_path,
        "CA certificates (PEM) to check the service's certificate against, instead of "
        "the system's.")
    timeout: float = option(
        10.0, parse_duration(minimum=0.1),
        "Longest wait to connect, and for each answer: a request that takes longer "
        "fails (and is tried again, see retries).")
    retries: int = option(
        2, parse_int(0, 10),
        "How many times a failed request is tried again before the operation fails "
        "(the message is then refused with 451 4.3.0, for its sender to retry).")
    threads: int = option(
        8, parse_int(1, 64),
        "Size of the bounded thread pool that makes the requests (uploads of a group "
        "go in parallel).")
    multipart_threshold: int = option(
        16 * 1024 * 1024, parse_size(minimum=5 * 1024 * 1024),
        "Blobs of this size or more are uploaded in parts (multipart upload, each part "
        "checked by the server), others with one PUT.", shown_default="16M")
    part_size: int = option(
        8 * 1024 * 1024, parse_size(minimum=5 * 1024 * 1024, maximum=5 * 1024 ** 3),
        "Size of the parts of a multipart upload (S3 asks at least 5M).",
        shown_default="8M")
    read_cache_size: int = option(
        64 * 1024 * 1024, parse_size(),
        "Memory for a cache of blobs read (least recently used ones go first; blobs "
        "over an eighth of it are not kept); 0: none.", shown_default="64M")
    spool_dir: Path | None = option(
        None, parse_optional_path,
        "Where a message larger than a few hundred KiB waits, on local disk, for its "
        "upload.", shown_default="STATE_DIR/s3-spool")


@dataclass(frozen=True)
class DirectoryConfig:
    backend: str = option(
        "sql", parse_choice("sql"),
        "Where users, domains and aliases live by default.  Domains named by a "
        "[backend:NAME] section (LDAP, a passwd-file) are served by it instead.")
    default_quota: int = option(
        0, parse_size(),
        "Mailbox quota for new users in bytes; 0 means unlimited.")
    recipient_delimiter: str = option(
        "+", parse_str,
        "Separates a local part from its detail (user+detail@example.com); empty disables.")
    auth_over_plaintext: bool = option(
        False, parse_bool,
        "Allow password authentication on connections without TLS (not for production).")
    mechanisms: tuple[str, ...] = option(
        ("PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"), parse_mechanisms,
        "SASL mechanisms offered by SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH, in this "
        "order.  -PLUS ones (channel binding: tls-exporter on TLS 1.3, "
        "tls-server-end-point) only on TLS connections.  SCRAM-SHA-1 is there for old "
        "clients, off unless named; CRAM-MD5 too (its stored secret is enough to pass it:"
        " kept only while it is named, made at each user's next password login).  "
        "Every mechanism, like LOGIN, needs TLS unless auth_over_plaintext.",
        shown_default="PLAIN LOGIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS")
    scram_iterations: int = option(
        4096, parse_int(minimum=4096),
        "PBKDF2 iterations of the SCRAM keys made when a password is set (RFC 7677 asks "
        "at least 4096); keys made with fewer are remade at the user's next password "
        "login.")
    login_failure_window: float = option(
        900.0, parse_duration(minimum=1.0),
        "How long a failed login counts against its client network (its IPv4 address, "
        "or IPv6 /64) and its account, and how long a lockout lasts.")
    login_delay_after: int = option(
        3, parse_int(minimum=1),
        "Failures (of a network or an account, within the window) after which the "
        "answer to each failed login is held back: first_delay, doubled each time.")
    login_max_delay: float = option(
        15.0, parse_duration(minimum=0.0),
        "The longest a failed login's answer is held back (the first is 1 s).")
    lockout_after: int = option(
        10, parse_int(minimum=0),
        "Failures from one client network within the window after which its logins are"
        " refused unchecked, with the answer of a wrong password, until the window "
        "passes.  0 disables.")
    account_lockout_after: int = option(
        50, parse_int(minimum=0),
        "Failures on one account from anywhere within the window after which it is "
        "locked the same way.  High by default: anyone can lock an account they can "
        "name.  0 disables.")
    auth_cache_ttl: float = option(
        600.0, parse_duration(minimum=0.0),
        "How long a verified password is remembered (in memory, as an HMAC with a "
        "per-process key) so that a client's next connections skip the argon2 work, as "
        "Dovecot's auth_cache_ttl; a changed password ends it at once.  0 disables.")
    resolve_cache_ttl: float = option(
        5.0, parse_duration(minimum=0.0),
        "How long a recipient's resolution (domain, user, aliases; found or not) is "
        "remembered in memory, so that RCPT needs no query.  A change made by this "
        "process forgets them at once; one made elsewhere (the lightmail command, "
        "another node) takes effect within this time.  0 disables.")


def parse_domains(raw: str, base: Path) -> tuple[str, ...]:
    """domain names, comma-separated"""
    names = []
    for item in (part.strip().lower().rstrip(".") for part in re.split(r"[,\s]+", raw)):
        if not item:
            continue
        if not re.fullmatch(rf"(?:{_LABEL}\.)+{_LABEL}", item):
            raise _BadValue(f"not a domain name: {item!r}")
        names.append(item)
    return tuple(names)


def parse_ldap_uri(raw: str, base: Path) -> str:
    """ldap://HOST[:PORT] or ldaps://HOST[:PORT]"""
    if not re.fullmatch(r"ldaps?://[^/\s:]+(?::\d{1,5})?/?", raw.strip(), re.IGNORECASE):
        raise _BadValue(f"expected ldap://host[:port] or ldaps://host[:port], got {raw!r}")
    return raw.strip().rstrip("/")


def parse_ldap_filter(raw: str, base: Path) -> str:
    """LDAP search filter (RFC 4515) with %u (the address), %n (its local part) and %d
    (its domain), escaped when put in"""
    if not raw:
        return ""
    from ldap3.core.exceptions import LDAPInvalidFilterError
    from ldap3.operation.search import parse_filter
    try:
        parse_filter(raw.replace("%u", "u").replace("%n", "n").replace("%d", "d"),
                     None, False, False, None, False)
    except LDAPInvalidFilterError:
        raise _BadValue(f"not an LDAP search filter (RFC 4515): {raw!r}") from None
    return raw


@dataclass(frozen=True)
class BackendConfig:
    """``[backend:NAME]``: where the users of some domains live instead of the SQL
    directory: an LDAP server, or a Dovecot-style passwd-file.  Logins and recipient
    lookups (RCPT) for those domains go to it; each user it knows gets a row in the
    SQL users table the first time they are seen, to own their mailboxes
    (docs/operations.rst, "Users in LDAP or a passwd-file")."""

    name: str = ""
    type: str = option(
        "", parse_choice("ldap", "passwd-file"),
        "ldap, or passwd-file (Dovecot's format: user:{SCHEME}hash:uid:gid::home::extra).")
    domains: tuple[str, ...] = option(
        (), parse_domains,
        "The domains this backend serves, comma-separated; a domain may be named by one "
        "backend only.  Every other domain stays in the SQL directory.")
    path: Path | None = option(
        None, parse_optional_path,
        "passwd-file: the file; read again when it changes.")
    uri: str = option(
        "", parse_ldap_uri,
        "ldap: the server, ldap://host[:port] (with starttls) or ldaps://host[:port].")
    starttls: bool = option(
        True, parse_bool,
        "ldap: with an ldap:// uri, upgrade each connection with StartTLS (RFC 4513 "
        "§3) and verify the server's certificate; no sends passwords in the clear.")
    ca_file: Path | None = option(
        None, parse_optional_path,
        "ldap: PEM file of the roots trusted for the server's certificate instead of "
        "the system's.")
    auth: str = option(
        "search", parse_choice("search", "bind"),
        "ldap: how a password is checked.  search: find the user's entry with "
        "user_filter (as bind_dn, or anonymously), then bind as it with the password; "
        "bind: bind straight as user_dn (no search before the password check).")
    bind_dn: str = option(
        "", parse_str,
        "ldap: the DN LightMail searches as; empty: anonymous searches.")
    bind_password_file: Path | None = option(
        None, parse_optional_path,
        "ldap: file holding bind_dn's password (its first line), read at start-up; "
        "never logged.")
    bind_password: str = field(default="", repr=False, compare=False)  # never shown
    base: str = option(
        "", parse_str, "ldap: where users are searched for (subtree), e.g. "
        "ou=people,dc=example,dc=com.")
    user_filter: str = option(
        "(&(objectClass=inetOrgPerson)(mail=%u))", parse_ldap_filter,
        "ldap: finds the entry of the user logging in (and of get_user).")
    recipient_filter: str = option(
        "", parse_ldap_filter,
        "ldap: finds the entry a recipient address leads to, by its address or an "
        "alias, e.g. (&(objectClass=inetOrgPerson)(|(mail=%u)(mailLocalAddress=%u))); "
        "empty: user_filter.")
    user_dn: str = option(
        "", parse_str,
        "ldap, auth = bind: the DN to bind as, with %u, %n and %d (escaped as an RDN "
        "value, RFC 4514), e.g. uid=%n,ou=people,dc=example,dc=com.")
    mail_attribute: str = option(
        "mail", parse_str, "ldap: the attribute holding the user's address.")
    alias_attribute: str = option(
        "", parse_str,
        "ldap: the attribute holding the user's other addresses (mail to them is "
        "delivered to the user, who may also send as them), e.g. mailLocalAddress or "
        "mailAlternateAddress; empty: none.")
    quota_attribute: str = option(
        "", parse_str,
        "ldap: the attribute holding the user's quota in bytes; empty, or an entry "
        "without it: [directory] default_quota.")
    enabled_attribute: str = option(
        "", parse_str,
        "ldap: when set, only users whose entry holds one of enabled_values in this "
        "attribute may log in or receive mail; empty: every user found.")
    enabled_values: tuple[str, ...] = option(
        ("TRUE",), parse_list,
        "ldap: the values of enabled_attribute that mean enabled (compared "
        "without regard to case).", shown_default="TRUE")
    pool_size: int = option(
        4, parse_int(1, 64),
        "ldap: connections to the server, each used by one thread at a time (the "
        "reactor never waits for LDAP).")
    timeout: float = option(
        5.0, parse_duration(minimum=0.1),
        "ldap: longest wait to connect and for each answer; then the login or RCPT "
        "gets a temporary failure.")
    auth_cache_ttl: float = option(
        60.0, parse_duration(minimum=0.0),
        "How long a successful login is remembered (an HMAC of the password, in "
        "memory), so that a client's next connections ask the server nothing; a "
        "password changed or account disabled on the server takes effect after it.  0 "
        "disables.")
    lookup_cache_ttl: float = option(
        5.0, parse_duration(minimum=0.0),
        "ldap: how long a user found by a recipient or user lookup is remembered.  "
        "0 disables.")


_LDAP_ONLY = ("uri", "ca_file", "bind_dn", "bind_password_file", "base", "user_dn",
              "recipient_filter", "alias_attribute", "quota_attribute", "enabled_attribute")


@dataclass(frozen=True)
class LoggingConfig:
    format: str = option(
        "text", parse_choice("text", "json"),
        "text: one human-readable line per event; json: one JSON object per line.")
    file: str = option(
        "-", parse_str,
        "Where log lines go: - for standard output, or a file path (opened again on "
        "SIGUSR1, for logrotate); empty for none (syslog only).")
    level: str = option(
        "info", parse_choice("debug", "info", "warn", "error"),
        "Least severe level that is written.")
    syslog: str = option(
        "", parse_syslog_target,
        "Also send every event to syslog as an RFC 5424 message: unix:/dev/log, "
        "udp:HOST:PORT or tcp:HOST:PORT (octet-counted frames); empty for none.  A "
        "receiver that is absent or full loses messages (counted), never stalls the "
        "server.")
    syslog_facility: str = option(
        "mail", parse_choice(*SYSLOG_FACILITIES), "The syslog facility of the messages.")
    syslog_app_name: str = option(
        "lightmail", parse_str, "APP-NAME of the syslog messages (RFC 5424 §6.2.5).")


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int = option(
        50 * 1024**2, parse_size(minimum=1024),
        "Largest message accepted, in octets (announced with SIZE, RFC 1870).")
    max_recipients: int = option(
        100, parse_int(1), "Most recipients per message (more get 452 4.5.3).")
    max_line_length: int = option(
        1000, parse_int(512, 65536),
        "Longest command or text line in octets, CRLF included (RFC 5321 §4.5.3.1).")
    max_errors: int = option(
        10, parse_int(1), "Errors in one session before it is closed with 421 4.7.0.")
    max_commands_before_auth: int = option(
        10, parse_int(1),
        "On submission: commands allowed before a successful AUTH.")
    command_timeout: float = option(
        300.0, parse_duration(minimum=1.0),
        "Idle time allowed between commands (RFC 5321 §4.5.3.2: at least 5 minutes).")
    data_timeout: float = option(
        600.0, parse_duration(minimum=1.0), "Idle time allowed inside DATA or BDAT.")
    session_timeout: float = option(
        1800.0, parse_duration(minimum=1.0),
        "Longest a session may last, busy or not; a transaction in progress is let finish.")
    drain_idle_timeout: float = option(
        1.0, parse_duration(minimum=0.0),
        "While the server drains (SIGTERM, lightmail node drain), a session that says "
        "nothing this long between transactions is closed with 421 4.3.2: time enough "
        "for a client that just connected, or just got its answer, to send its next "
        "command.  (A session may still make its first transaction while the server "
        "drains; after one, its next MAIL is answered 421 4.3.2.)")
    require_sender_match: bool = option(
        True, parse_bool,
        "On submission: MAIL FROM must be the user's address or one of their aliases.")
    smtputf8: bool = option(
        True, parse_bool, "Offer SMTPUTF8 (RFC 6531): UTF-8 addresses and headers.")
    requiretls: bool = option(
        True, parse_bool,
        "Offer REQUIRETLS (RFC 8689) on TLS sessions: a message sent with it is relayed "
        "only over verified TLS to servers that offer it too, or bounces.")
    direct_delivery: bool = option(
        True, parse_bool,
        "File a message whose recipients are all local straight into their mailboxes, "
        "in the transaction that accepts it (as LMTP does); the 250 then means filed. "
        "A recipient that cannot be filed at once (over quota, say) and every message "
        "with a remote recipient go through the queue.  no: queue every message first.")


@dataclass(frozen=True)
class LMTPConfig:
    """LMTP (RFC 2033) shares the [smtp] limits; these options are its own."""

    quota_full_tempfail: bool = option(
        False, parse_bool,
        "Answer a recipient over quota with 452 4.2.2 (try later) instead of 552 5.2.2 "
        "(as Dovecot's lmtp_quota_full_tempfail).")


def login_timeout_option() -> Any:
    """``login_timeout`` of [imap] and [pop3]."""
    return option(60.0, parse_duration(minimum=1.0),
                  "Time a session has to log in, from its connection, busy or not; then "
                  "it is closed.  Clients log in at once: a session that does not holds a "
                  "connection for nothing.")


@dataclass(frozen=True)
class POP3Config:
    """POP3 (RFC 1939, 2449).  APOP is never offered: it needs cleartext passwords and
    LightMail keeps only argon2 hashes."""

    command_timeout: float = option(
        600.0, parse_duration(minimum=1.0),
        "Idle time allowed between commands (RFC 1939 §3: at least 10 minutes).")
    max_line_length: int = option(
        512, parse_int(255, 65536),
        "Longest command line in octets, CRLF included (RFC 2449 §4: at least 255).")
    max_errors: int = option(
        10, parse_int(1), "Errors in one session before it is closed.")
    login_timeout: float = login_timeout_option()
    login_delay: float = option(
        0.0, parse_duration(minimum=0.0),
        "Least time between two logins of a user, announced as LOGIN-DELAY (RFC 2449); "
        "0 announces and enforces nothing.")
    expire: str = option(
        "NEVER", parse_expire,
        "Retention announced as EXPIRE (RFC 2449): NEVER, or days.  LightMail itself "
        "deletes nothing unless told.")


@dataclass(frozen=True)
class IMAPConfig:
    """IMAP4rev2 and IMAP4rev1 (RFC 9051, 3501)."""

    idle_timeout: float = option(
        1800.0, parse_duration(minimum=1.0),
        "Time allowed without a command; a new IDLE command starts it again.  RFC 9051 "
        "§5.4 asks for at least 30 minutes: shorter only for tests.")
    max_line_length: int = option(
        65536, parse_int(1024, 16 * 1024**2),
        "Longest command line in octets, literals not counted (as Dovecot's "
        "imap_max_line_length).")
    max_literal: int = option(
        50 * 1024**2, parse_size(minimum=1024),
        "Largest literal, and so the largest message APPEND takes (announced as "
        "APPENDLIMIT, RFC 7889).")
    login_timeout: float = login_timeout_option()
    max_login_input: int = option(
        8192, parse_size(minimum=1024),
        "Before login: the longest command line, literal and AUTHENTICATE response, in "
        "octets.  A larger literal is refused before the client sends it (NO "
        "[TOOBIG]), so that nobody holds memory on the server without a password.")
    max_errors: int = option(
        20, parse_int(1), "Bad commands in one session before it is closed with BYE.")
    max_connections_per_user: int = option(
        20, parse_int(1),
        "Most IMAP sessions one user may have open at once (over all IMAP listeners).")
    special_use: tuple[str, ...] = option(
        ("Drafts:\\Drafts", "Sent:\\Sent", "Trash:\\Trash", "Junk:\\Junk",
         "Archive:\\Archive"),
        parse_special_use,
        "Mailboxes every user has (created at login when missing, as Dovecot's "
        "auto = create), as NAME:\\USE pairs (RFC 6154), comma-separated.")
    header_cache: int = option(
        64 * 1024**2, parse_size(),
        "Memory for the parsed header blocks of recently read messages, shared by a "
        "process's IMAP sessions (FETCH of header fields, SEARCH on header keys, SORT, "
        "THREAD); about 2 KB for a small header block, 10 KB for a 3 KB one.  0 keeps "
        "none.")


def auth_user_option(target: str) -> Any:
    """``auth_user`` of [outbound] and [transport:DOMAIN]: the SMTP client's AUTH."""
    return option("", parse_str,
                  f"SMTP AUTH (RFC 4954) user name for {target}; empty: no AUTH.  Sent "
                  "only over TLS (STARTTLS), unless tls = none.")


def auth_password_file_option() -> Any:
    return option(None, parse_optional_path,
                  "File holding the SMTP AUTH password (its first line), read at "
                  "start-up and by a reload; needed with auth_user.")


def auth_password_field() -> Any:
    """Read from auth_password_file by parse_config; never shown or logged."""
    return field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class OutboundConfig:
    """The outbound MTA: the queue's retry schedule and how mail leaves."""

    relay_host: str = option(
        "", parse_str,
        "Send all outbound mail through this host instead of looking up MX records: "
        "[host]:port (brackets: no MX lookup, as in Postfix), or empty.")
    port: int = option(
        25, parse_int(1, 65535),
        "TCP port of the receiving MTAs (25; another only in a lab).")
    dns_servers: str = option(
        "", parse_str,
        "Resolvers to ask, as host or host:port, comma-separated; empty: /etc/resolv.conf.")
    tls: str = option(
        "may", parse_choice("may", "none", "encrypt"),
        "STARTTLS policy: may (when offered; certificate verification is logged), "
        "encrypt (required: defer otherwise), none.")
    auth_user: str = auth_user_option("relay_host")
    auth_password_file: Path | None = auth_password_file_option()
    auth_password: str = auth_password_field()
    concurrency: int = option(
        100, parse_int(1, 1000), "Deliveries in progress at once (all transports).")
    destination_concurrency: int = option(
        20, parse_int(1, 1000),
        "Deliveries in progress at once to one domain (as Postfix's "
        "default_destination_concurrency_limit).")
    mta_sts: bool = option(
        True, parse_bool,
        "Honour receiving domains' MTA-STS policies (RFC 8461): verified TLS to the MX "
        "hosts they name.")
    dane: bool = option(
        True, parse_bool,
        "Honour receiving domains' DANE TLSA records (RFC 7672): where an MX host has "
        "DNSSEC-validated TLSA records, mail goes to it only over TLS with a "
        "certificate that matches them (and DANE wins over MTA-STS).  Needs a "
        "validating resolver in dns_servers (unbound, or systemd-resolved with "
        "DNSSEC=yes, on this host): LightMail trusts its AD bit.  With a resolver "
        "that does not validate no answer is authenticated and nothing changes (no "
        "TLSA lookups are even made), hence yes by default.  The same AD bit on a "
        "domain's MX answer lets a REQUIRETLS message (RFC 8689) go to its MX hosts "
        "without an MTA-STS policy.")
    ca_file: Path | None = option(
        None, parse_path,
        "PEM file of the roots trusted for MX certificates, MTA-STS policy servers and "
        "TLS-RPT report servers instead of the system's (a private CA, or a test).")
    session_idle: float = option(
        5.0, parse_duration(minimum=0.0),
        "How long a finished SMTP session waits for the next message to the same "
        "server (connection reuse); 0: one message per connection.")
    connect_timeout: float = option(
        30.0, parse_duration(minimum=1.0), "Longest wait for a TCP connection.")
    command_timeout: float = option(
        300.0, parse_duration(minimum=1.0),
        "Longest wait for a reply (RFC 5321 §4.5.3.2 asks for 5 minutes).")
    data_timeout: float = option(
        600.0, parse_duration(minimum=1.0),
        "Longest wait for the reply to the end of the content (RFC 5321: 10 minutes).")
    min_backoff: float = option(
        300.0, parse_duration(minimum=1.0),
        "Wait before the first retry; it doubles with each failure (with jitter).")
    max_backoff: float = option(
        14400.0, parse_duration(minimum=1.0), "Longest wait between two retries.")
    max_lifetime: float = option(
        5 * 86400.0, parse_duration(minimum=60.0),
        "After this long in the queue a message that still cannot be delivered bounces.")
    delay_warning_time: float = option(
        0.0, parse_duration(minimum=0.0),
        "Warn the sender (a DSN with Action: delayed, RFC 3464) when a message is "
        "still undelivered this long after it arrived, as Postfix's "
        "delay_warning_time: once per recipient, at its first failed attempt after "
        "that time, never to the null sender, and only when the recipient's NOTIFY "
        "allows it (none given, or one with DELAY).  0: no warnings.",
        shown_default="0 (no warnings)")


@dataclass(frozen=True)
class DKIMConfig:
    """DKIM signing of outgoing mail (RFC 6376; Ed25519 keys, RFC 8463), as OpenDKIM
    with a KeyTable and a SigningTable: the domain of a message's From: field picks
    its keys.  ``lightmail dkim genkey DOMAIN`` makes a key and prints its DNS record."""

    enabled: bool = option(
        True, parse_bool,
        "Sign outgoing mail with the keys below.  no: sign nothing, and read no key.")
    keys: tuple[DKIMKeySpec, ...] = option(
        (), parse_dkim_keys,
        "Signing keys as DOMAIN:SELECTOR:KEYFILE, separated by commas or on "
        "continuation lines.  A message whose From: address is in DOMAIN (exactly: "
        "subdomains need entries of their own) is signed with d=DOMAIN and s=SELECTOR, "
        "once per key of that domain (an RSA and an Ed25519 key: two signatures, the "
        "first listed on top).  KEYFILE is a PEM private key, RSA (at least 1024 bits) "
        "or Ed25519, unencrypted, readable by LightMail; the algorithm follows from "
        "the key.  The keys are read at start-up and by a reload: one that cannot be "
        "used stops the start, or has the reload refused.",
        shown_default="(none: nothing is signed)")
    sources: tuple[str, ...] = option(
        ("submission", "local"), parse_choices("submission", "local", "mx"),
        "Which messages are signed (when their From: domain has a key): submission, "
        "mail from authenticated users; local, mail LightMail writes itself (delivery "
        "notices, From: MAILER-DAEMON@hostname); mx, mail that came in on the MX and "
        "leaves again (aliases to other domains).  mx would sign whatever a stranger "
        "sends with your From: domain, so it is off by default (as OpenDKIM signs only "
        "for its InternalHosts and authenticated clients).",
        shown_default="submission, local")
    headers: tuple[str, ...] = option(
        ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
         "content-type", "content-transfer-encoding", "in-reply-to", "references"),
        parse_header_names(("from",)),
        "Header fields signed, each occurrence the message has (must include from).",
        shown_default="from, to, cc, subject, date, message-id, reply-to, mime-version, "
                      "content-type, content-transfer-encoding, in-reply-to, references")
    oversign: tuple[str, ...] = option(
        ("from",), parse_header_names(),
        "Header fields signed once more than the message has them, so that one added "
        "on the way breaks the signature (OpenDKIM's OversignHeaders).",
        shown_default="from")
    verify_max_signatures: int = option(
        5, parse_int(1, 50),
        "Incoming mail (listeners whose checks include dkim): the most DKIM signatures "
        "verified per message, top first; the others are reported as 'policy' (not "
        "checked).  Each costs a DNS lookup and a pass over the message.")
    verify_min_rsa_bits: int = option(
        1024, parse_int(512, 8192),
        "Incoming mail: RSA keys shorter than this fail verification as 'policy' "
        "(RFC 8301 §3.2 asks verifiers to refuse keys under 1024 bits).")
    verify_rsa_sha1: bool = option(
        False, parse_bool,
        "Incoming mail: accept rsa-sha1 signatures.  RFC 8301 §3.1 says verifiers must "
        "not consider them valid, so by default they are reported as 'policy' (not a "
        "pass); OpenDKIM and rspamd still accept them, and so does this with yes.")


@dataclass(frozen=True)
class SPFConfig:
    """SPF (RFC 7208) on listeners whose checks include spf: whether the client may
    send for the HELO name and the MAIL FROM domain, checked at MAIL FROM
    (authenticated sessions are not checked).  The replies are RFC 7372's."""

    check_helo: bool = option(
        True, parse_bool,
        "Check the HELO/EHLO name's policy too (RFC 7208 §2.3); a HELO fail is "
        "conclusive, otherwise the MAIL FROM result decides.")
    fail_action: str = option(
        "reject", parse_choice("reject", "tag"),
        "On fail: reject (550 5.7.23 with the domain's explanation, as Postfix's "
        "policyd-spf does), or tag (only record it in Authentication-Results and "
        "let DMARC decide, as RFC 7489 §10.1 suggests for DMARC-aware receivers).")
    temperror_action: str = option(
        "tempfail", parse_choice("tempfail", "tag"),
        "On a temporary DNS error: tempfail (451 4.7.24: the client tries again "
        "later) or tag (accept and record it).")
    permerror_action: str = option(
        "tag", parse_choice("tag", "reject"),
        "On a broken SPF record: tag (accept and record it, as policyd-spf does) or "
        "reject (550 5.7.24).")
    time_limit: float = option(
        20.0, parse_duration(minimum=1.0),
        "Longest a check may take, all its DNS lookups together; beyond it the "
        "result is temperror.")


@dataclass(frozen=True)
class AntivirusConfig:
    """ClamAV on the listeners whose checks include antivirus: each message is sent
    to clamd (its INSTREAM command) at the end of DATA on SMTP and LMTP, and as it
    is uploaded by IMAP APPEND (an infected one gets NO there)."""

    socket: str = option(
        "unix:/run/clamav/clamd.ctl", parse_scanner_address,
        "Where clamd listens: unix:/PATH (its LocalSocket; Debian's is "
        "/run/clamav/clamd.ctl) or tcp:HOST:PORT (its TCPSocket, usually 3310).")
    timeout: float = option(
        30.0, parse_duration(minimum=0.1),
        "Longest a scan may take, connecting included; beyond it the scanner counts "
        "as not available (see on_error).")
    action: str = option(
        "reject", parse_choice("reject", "quarantine"),
        "An infected message: reject (554 5.7.1 with the virus's name: the sender's "
        "server bounces it) or quarantine (accept it and file it in quarantine_folder "
        "of each local recipient, with X-Virus-Status: Infected).")
    quarantine_folder: str = option(
        "Quarantine", parse_str,
        "The folder quarantined messages go to (action = quarantine).")
    on_error: str = option(
        "tempfail", parse_choice("tempfail", "accept"),
        "When clamd cannot be reached, is too slow or answers something that is not "
        "a verdict: tempfail (451 4.7.1 over SMTP and LMTP, NO [UNAVAILABLE] to IMAP "
        "APPEND: the client tries again later, nothing is lost) or accept (deliver "
        "it with X-Virus-Status: Unscanned).  Either way a warning is logged.")
    max_size: int = option(
        25 * 1024 * 1024, parse_size(minimum=1),
        "Larger messages are not scanned but delivered with X-Virus-Status: Unscanned "
        "(keep it at most clamd's StreamMaxLength, 25 MB by default: a message over "
        "that limit is treated the same way).",
        shown_default="25M")


@dataclass(frozen=True)
class SpamConfig:
    """Spam scoring on the listeners whose checks include spam (rspamd, or
    SpamAssassin's spamd), and Junk training: a message a user moves into the Junk
    mailbox over IMAP is learnt as spam, one moved out of it (not to Trash) as ham."""

    DEFAULT_ACTIONS = (("reject", "reject"), ("soft reject", "tempfail"),
                       ("greylist", "tempfail"), ("rewrite subject", "junk"),
                       ("add header", "junk"), ("no action", "tag"))

    backend: str = option(
        "rspamd", parse_choice("rspamd", "spamd"),
        "The scanner: rspamd (its HTTP protocol) or spamd (SpamAssassin's SPAMC "
        "protocol).")
    url: str = option(
        "http://127.0.0.1:11333", parse_http_url,
        "rspamd's normal worker, where messages are scored (POST /checkv2).")
    controller_url: str = option(
        "http://127.0.0.1:11334", parse_http_url,
        "rspamd's controller worker, where Junk training sends lessons "
        "(/learnspam, /learnham).")
    password: str = option(
        "", parse_str,
        "The controller's password (its enable_password or password), when it asks "
        "for one; none is needed from the addresses in its secure_ip.")
    socket: str = option(
        "tcp:127.0.0.1:783", parse_scanner_address,
        "spamd's address (backend = spamd): tcp:HOST:PORT or unix:/PATH.  Junk training "
        "needs spamd to run with --allow-tell.")
    reject_score: float = option(
        15.0, parse_float(),
        "backend = spamd: a spam with at least this score counts as rspamd's reject "
        "action, any other spam as add header (spamd has no actions of its own).")
    timeout: float = option(
        20.0, parse_duration(minimum=0.1),
        "Longest a scan or a lesson may take; beyond it the scanner counts as not "
        "available (see on_error).")
    actions: tuple[tuple[str, str], ...] = option(
        DEFAULT_ACTIONS, parse_spam_actions,
        "What each of the scanner's actions does: reject (550 5.7.1), tempfail "
        "(451 4.7.1: the client tries again, as greylisting asks), junk (accept, add "
        "the X-Spam-* header fields and file it in the Junk mailbox) or tag (accept "
        "and add the fields).  Pairs ACTION:RESULT, for rspamd's actions: reject, "
        "soft reject, rewrite subject, add header, greylist, no action.  The subject "
        "is never rewritten.",
        shown_default="reject:reject, soft reject:tempfail, greylist:tempfail, "
                      "rewrite subject:junk, add header:junk, no action:tag")
    on_error: str = option(
        "accept", parse_choice("accept", "tempfail"),
        "When the scanner cannot be reached, is too slow or answers garbage: accept "
        "(deliver with X-Spam-Status: Unscanned) or tempfail (451 4.7.1).  Either way "
        "a warning is logged.")
    max_size: int = option(
        10 * 1024 * 1024, parse_size(minimum=1),
        "Larger messages are not scored (X-Spam-Status: Unscanned): spam is small, "
        "and scoring a large message costs the scanner most.", shown_default="10M")
    learn: bool = option(
        True, parse_bool,
        "Junk training: queue a lesson for the scanner when a user copies or moves "
        "a message into Junk (spam) or out of it into a mailbox other than Trash "
        "(ham).  Only where some listener's checks include spam.  The lessons wait "
        "in the database and are retried until the scanner takes them.")
    junk_folder: str = option(
        "", parse_str,
        "The Junk mailbox's name: where junk-rated mail is filed, and what training "
        "watches (besides any mailbox with the \\Junk special use).",
        shown_default="Junk")
    learn_retry_limit: float = option(
        2 * 86400.0, parse_duration(minimum=60.0),
        "A lesson the scanner has not taken after this long is dropped (logged); "
        "until then it is retried, at growing intervals up to an hour.",
        shown_default="2d")

    @property
    def junk_name(self) -> str:
        return self.junk_folder or "Junk"


@dataclass(frozen=True)
class InboundConfig:
    """The inbound policy chain (the checks each SMTP listener's ``checks`` names) and
    the Authentication-Results header field (RFC 8601) it writes."""

    authserv_id: str = option(
        "", parse_str,
        "The authserv-id of our Authentication-Results fields; fields from outside "
        "that claim it are removed (RFC 8601 §5).",
        shown_default="the server's hostname")


@dataclass(frozen=True)
class ARCConfig:
    """ARC (RFC 8617): verifying the chain of ARC sets that forwarders put on a message
    (listeners whose checks include arc), and sealing what LightMail forwards."""

    trusted_sealers: tuple[str, ...] = option(
        (), parse_domains,
        "Domains whose ARC results are trusted for forwarded mail: when the chain "
        "passes and its newest ARC-Seal is by one of them (d=, exactly), DMARC may "
        "accept a message whose SPF and DKIM broke on the way (a mailing list, a "
        "forwarding service) on the strength of what that sealer found.",
        shown_default="(none)")
    max_instances: int = option(
        20, parse_int(1, 50),
        "The most ARC sets a chain may have; a longer one fails without being "
        "checked (RFC 8617 allows at most 50).  Each set costs DNS lookups and "
        "signature checks.")
    temperror_action: str = option(
        "tempfail", parse_choice("tempfail", "tag"),
        "When a key of the chain cannot be looked up for a while (DNS timeout, "
        "SERVFAIL) and the newest sealer is a trusted one (only then does the "
        "result change what happens to the message): tempfail (451 4.4.3: the "
        "client tries again later) or tag (the chain fails, as RFC 8617 §5.2.1 "
        "has every failure permanent).  With an untrusted sealer the chain fails.")
    seal: bool = option(
        False, parse_bool,
        "Add an ARC set to mail that came in from outside (on the MX or by LMTP) "
        "and leaves again (aliases to remote addresses): our Authentication-Results "
        "as ARC-Authentication-Results, an ARC-Message-Signature and an ARC-Seal "
        "with the chain's result, so that the next receiver can see what we found.")
    seal_keys: tuple[DKIMKeySpec, ...] = option(
        (), parse_dkim_keys,
        "The sealing key, DOMAIN:SELECTOR:KEYFILE as [dkim] keys (one entry: a hop "
        "adds one ARC set).  KEYFILE is an RSA private key (PEM, at least 1024 "
        "bits): ARC seals with rsa-sha256.  The same key may serve DKIM; its record "
        "at SELECTOR._domainkey.DOMAIN is what verifiers look up.",
        shown_default="(none)")


INBOUND_CHECKS = ("access", "limits", "spf", "reverse", "dnsbl", "greylist", "dkim", "arc",
                  "dmarc", "antivirus", "spam", "milter")
#: Checks that need a scanner the admin runs: only where a listener names them.
SCANNER_CHECKS = ("antivirus", "spam")
#: Checks that change what a sender meets (refusing clients without a name, asking
#: every new one to come back): only where a listener names them, as in Postfix.
OPT_IN_CHECKS = ("reverse", "greylist")


def parse_checks(raw: str, base: Path) -> tuple[str, ...]:
    """"default", "none", or a list of the inbound checks"""
    if raw.strip().lower() in ("default", ""):
        return ("default",)
    if raw.strip().lower() == "none":
        return ()
    return parse_choices(*INBOUND_CHECKS)(raw, base)


def parse_milter_socket(raw: str, base: Path) -> str:
    """unix:PATH or inet:HOST:PORT (Sendmail's inet:PORT@HOST and local:PATH too)"""
    kind, sep, rest = raw.strip().partition(":")
    kind = kind.lower()
    if sep and rest and kind in ("unix", "local"):
        return f"unix:{parse_path(rest, base)}"
    if sep and rest and kind in ("inet", "inet6"):
        if "@" in rest:
            port, _, host = rest.partition("@")
        else:
            host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return f"inet:[{host}]:{int(port)}" if ":" in host else f"inet:{host}:{port}"
    raise _BadValue(f"expected unix:PATH or inet:HOST:PORT, got {raw!r}")


@dataclass(frozen=True)
class MilterConfig:
    """``[milter:NAME]``: a mail filter spoken to with the Sendmail milter protocol
    (version 6; OpenDKIM, rspamd's proxy, ...) by the listeners whose checks include
    milter, at MAIL FROM, each RCPT TO and the end of the message, one connection per
    SMTP session.  The milters run in the order of their sections."""

    name: str = ""
    socket: str = option(
        "", parse_milter_socket,
        "Where the milter listens: unix:/run/opendkim/opendkim.sock or "
        "inet:127.0.0.1:11332 (as Postfix writes it; Sendmail's inet:PORT@HOST is "
        "read too).")
    connect_timeout: float = option(
        30.0, parse_duration(minimum=0.1),
        "Longest wait to connect and negotiate (Postfix's milter_connect_timeout).")
    command_timeout: float = option(
        30.0, parse_duration(minimum=0.1),
        "Longest wait for the answer to one command (connect, HELO, MAIL, RCPT, a "
        "header, a body chunk; Postfix's milter_command_timeout).")
    eom_timeout: float = option(
        300.0, parse_duration(minimum=0.1),
        "Longest wait for the answers at the end of the message, where milters do "
        "their work (Postfix's milter_content_timeout).")
    default_action: str = option(
        "tempfail", parse_choice("accept", "tempfail", "reject"),
        "What happens when the milter cannot be reached, times out or breaks the "
        "protocol, for the rest of the session (Postfix's milter_default_action): "
        "accept (go on without it), tempfail (451 4.7.1: the client tries again "
        "later) or reject (550 5.7.1).")
DMARC_ACTIONS = ("reject", "quarantine", "tag")


def parse_domain_actions(raw: str, base: Path) -> tuple[tuple[str, str], ...]:
    """DOMAIN:ACTION entries, separated by commas or line breaks (ACTION: reject,
    quarantine or tag)"""
    entries: list[tuple[str, str]] = []
    for item in (part.strip() for part in re.split(r"[,\n]", raw)):
        if not item:
            continue
        domain, sep, action = item.rpartition(":")
        domain, action = domain.strip().rstrip(".").lower(), action.strip().lower()
        if not sep or action not in DMARC_ACTIONS:
            raise _BadValue(f"expected DOMAIN:ACTION with ACTION one of "
                            f"{', '.join(DMARC_ACTIONS)}, got {item!r}")
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_domain = ""
        if not _DOMAIN_RE.fullmatch(ascii_domain):
            raise _BadValue(f"expected a domain name, got {domain!r} in {item!r}")
        if any(known == ascii_domain for known, _ in entries):
            raise _BadValue(f"{domain} is given twice")
        entries.append((ascii_domain, action))
    return tuple(entries)


@dataclass(frozen=True)
class DMARCConfig:
    """DMARC (RFC 7489) for mail that comes in on the MX: the policy of the domain in a
    message's From: field, checked against its SPF and DKIM results
    (lightmail/policy/dmarc), what is done with a message that fails it, and the
    aggregate reports sent to the domains that ask for them (``rua``)."""

    enabled: bool = option(
        True, parse_bool,
        "Check DMARC for incoming mail.  no: no policy is looked up, nothing is "
        "enforced or recorded.")
    public_suffix_list: Path | None = option(
        None, parse_optional_path,
        "The Public Suffix List file (publicsuffix.org's public_suffix_list.dat) that "
        "gives each domain its organizational domain (RFC 7489 §3.2), read at start-up "
        "and by each reload, so that a list fetched by cron needs no new release (see "
        "docs/operations.rst).  Empty: the list shipped with the publicsuffixlist "
        "package.",
        shown_default="(empty: the list shipped with the publicsuffixlist package)")
    enforce: str = option(
        "reject", parse_choice(*DMARC_ACTIONS),
        "What is done with a message that fails DMARC when its domain's policy asks for "
        "more than none: reject, as the policy asks (p=reject: 550 5.7.1 at the end of "
        "DATA; p=quarantine: filed into the recipient's Junk mailbox); quarantine, into "
        "Junk even when the policy says reject; tag, nothing but the "
        "Authentication-Results header.  A message the policy's pct= leaves out gets "
        "the next milder treatment (RFC 7489 §6.6.4).")
    domain_actions: tuple[tuple[str, str], ...] = option(
        (), parse_domain_actions,
        "Exceptions to enforce, as DOMAIN:ACTION entries (ACTION: reject, quarantine "
        "or tag), separated by commas or on continuation lines.  DOMAIN is the From: "
        "domain or the domain whose policy applied (its organizational domain when "
        "the From: domain has no record of its own); the From: domain's entry wins.",
        shown_default="(none)")
    reject_malformed_from: bool = option(
        False, parse_bool,
        "Reject (550 5.7.1) a message whose From: field DMARC cannot judge: none, more "
        "than one, several addresses of different domains, or no domain (RFC 7489 "
        "§6.6.1), as OpenDMARC's RequiredHeaders and RejectMultiValueFrom.  no "
        "(OpenDMARC's default too): such a message gets no DMARC verdict (the first "
        "From: field is used when there are several).")
    reports: bool = option(
        False, parse_bool,
        "Record the result of each message whose domain asks for aggregate reports "
        "(rua=mailto:...) and send each such domain a daily report (RFC 7489 §7.2), "
        "through LightMail's own queue.  Off by default: the reports go to other "
        "organizations.")
    report_interval: float = option(
        86400.0, parse_duration(minimum=60.0),
        "How often the reports are sent; the runs fall on multiples of the interval "
        "since midnight UTC (daily: at midnight UTC).  ``lightmail dmarc "
        "send-reports`` sends them at once.",
        shown_default="1d")
    report_org_name: str = option(
        "", parse_str,
        "The organization named in the reports (org_name).  Empty: [server] hostname.")
    report_from: str = option(
        "", parse_optional_address,
        "The address the reports come from (From: and the envelope sender; bounces "
        "come back to it).  Empty: postmaster@ [server] hostname.")


def parse_optional_domain(raw: str, base: Path) -> str:
    """domain name, or empty"""
    if not raw:
        return ""
    names = parse_domains(raw, base)
    if len(names) != 1:
        raise _BadValue(f"expected one domain name, got {raw!r}")
    return names[0]


def parse_srs_age(raw: str, base: Path) -> float:
    """duration of 1 to 1023 days (d suffix; plain numbers are seconds)"""
    value = parse_duration(minimum=86400.0)(raw, base)
    if value >= 1024 * 86400.0:
        raise _BadValue(f"at most 1023 days (the SRS timestamp counts days modulo "
                        f"1024), got {raw!r}")
    return value


@dataclass(frozen=True)
class SRSConfig:
    """The Sender Rewriting Scheme for mail that aliases forward to other domains (the
    libsrs2/postsrsd scheme; see docs/operations.rst): the forwarded copy is sent from
    SRS0=HASH=TT=origin.example=alice@DOMAIN so that it passes SPF at the destination,
    and a bounce to that address comes back and goes on to alice@origin.example."""

    enabled: bool = option(
        True, parse_bool,
        "Rewrite the MAIL FROM of mail that came in from outside (MX or LMTP, no AUTH, "
        "no trusted network) and leaves for another domain through an alias, and "
        "accept bounces to the "
        "rewritten addresses.  no: forwarded mail keeps its sender, and fails SPF "
        "wherever the sender's domain publishes a strict policy.")
    domain: str = option(
        "", parse_optional_domain,
        "The domain of the rewritten addresses.  Its MX record must point at this "
        "server; it needs no entry in the directory (SRS0=/SRS1= addresses at it are "
        "accepted on their own, other addresses at it only if it is a local domain).",
        shown_default="[server] hostname")
    secret_file: Path | None = option(
        None, parse_optional_path,
        "The secrets, one a line: the first signs new addresses, every one verifies "
        "returning bounces (to rotate: put a new line first, reload, and drop the old "
        "one after max_age).  Made with one random secret, mode 0600, at the first "
        "start when missing.  The same file works with postsrsd.",
        shown_default="<state_dir>/srs.secret")
    max_age: float = option(
        21 * 86400.0, parse_srs_age,
        "How long after forwarding a bounce to a rewritten address is accepted "
        "(counted in whole days).",
        shown_default="21d")
    exclude_domains: tuple[str, ...] = option(
        (), parse_domains,
        "Senders' domains never rewritten (exactly these names; e.g. domains whose "
        "SPF record lists this server).  Senders in local domains, and at the SRS "
        "domain itself, are never rewritten anyway.",
        shown_default="(none)")


@dataclass(frozen=True)
class ListenerConfig:
    name: str = ""
    protocol: str = option(
        "", parse_str,
        "Protocol spoken on this listener (see 'lightmail check-config' for those available).")
    endpoint: str = option(
        "", parse_endpoint,
        "Twisted strports description, e.g. tcp:2525:interface=127.0.0.1 or "
        "unix:/run/lightmail/lmtp.sock:mode=660.")
    tls: str = option(
        "none", parse_choice("none", "starttls", "implicit"),
        "none, starttls (offered after connect) or implicit (TLS from the first byte).")
    tls_cert: Path | None = option(
        None, parse_optional_path, "PEM certificate chain for TLS.")
    tls_key: Path | None = option(
        None, parse_optional_path, "PEM private key for TLS.")
    tls_sni: tuple[tuple[Path, Path], ...] = option(
        (), parse_cert_pairs,
        "More certificates, picked by the name the client asks for (SNI, RFC 6066): "
        "CERT:KEY pairs separated by commas.  tls_cert/tls_key stay the default.")
    max_connections: int = option(
        1000, parse_int(1), "Most simultaneous connections on this listener.")
    max_connections_per_ip: int = option(
        20, parse_int(1), "Most simultaneous connections from one client address.")
    checks: tuple[str, ...] = option(
        ("default",), parse_checks,
        "The inbound policy checks run on this listener, among access (the allow- "
        "and blocklists: [access], 'lightmail access'), limits ([limits]), spf, "
        "reverse ([reverse]), dnsbl ([dnsbl]), greylist ([greylist]), dkim, arc, "
        "dmarc (see [spf], [dkim], [arc], [dmarc] and [inbound]), "
        "antivirus and spam (see [antivirus] and [spam]: scanners you run) and "
        "milter (every [milter:NAME], in the file's order); none: no check.  "
        "default: all of them but the scanners, reverse and greylist on an smtp "
        "(MX) listener, limits on submission, none on LMTP, whose clients are "
        "trusted.  On an imap listener only antivirus applies (to APPEND).",
        shown_default="default")
    max_unauthenticated: int = option(
        0, parse_int(0),
        "Most simultaneous connections that have not logged in (yet): the rest of "
        "max_connections stays for sessions that have, so that idle connections "
        "nobody logs in on cannot fill the listener for everyone.  0: a quarter of "
        "max_connections on IMAP, POP3 and submission listeners, no separate limit "
        "on others (on SMTP and LMTP nobody logs in).")
    proxy_protocol: str = option(
        "no", parse_choice("no", "v1", "v2", "any"),
        "The PROXY protocol (HAProxy's send-proxy and send-proxy-v2, as other TCP load "
        "balancers send it): connections from proxy_from (the balancers) begin with a "
        "header that names the client, and the session, the logs, the connection "
        "limits, the access lists, SPF, Received: and Authentication-Results see that "
        "client.  v1, v2: that version; any: either; no: none.  A connection from "
        "proxy_from without a header of that version (or whose header is malformed, "
        "or late: proxy_timeout) is closed; one from anywhere else is served as it is, "
        "and closed if it sends a header.  With tls = implicit the header comes "
        "before the TLS handshake.  A version 2 LOCAL header (a health check) or "
        "version 1 UNKNOWN leaves the connection's own address.  Needs a restart.")
    proxy_from: tuple[str, ...] = option(
        (), parse_networks,
        "The addresses or networks of the load balancers that send the PROXY header "
        "(needed with proxy_protocol; nobody else is believed).")
    proxy_timeout: float = option(
        5.0, parse_duration(0.001),
        "How long a connection from proxy_from may take to send its whole PROXY "
        "header before it is closed.")

    @property
    def inbound_checks(self) -> tuple[str, ...]:
        """The checks as they apply (see ``checks``)."""
        if self.checks == ("default",):
            return {"smtp": tuple(check for check in INBOUND_CHECKS
                                  if check not in SCANNER_CHECKS + OPT_IN_CHECKS),
                    "submission": ("limits",)}.get(self.protocol, ())
        return self.checks

    @property
    def unauthenticated_limit(self) -> int:
        """max_unauthenticated as it applies (see its help)."""
        if self.max_unauthenticated:
            return self.max_unauthenticated
        if self.protocol in ("imap", "pop3", "submission"):
            return max(1, self.max_connections // 4)
        return self.max_connections


@dataclass(frozen=True)
class TransportConfig:
    """``[transport:DOMAIN]``: how mail for DOMAIN (or, for ``.DOMAIN``, its
    subdomains) leaves, instead of the MX records and ``[outbound]``'s settings."""

    domain: str = ""
    relay: str = option(
        "", parse_str,
        "Where to send: [host]:port (no MX lookup) or host:port; empty: the domain's MX.")
    protocol: str = option(
        "smtp", parse_choice("smtp", "lmtp"),
        "smtp, or lmtp to hand the mail to a mailbox server (Dovecot, Cyrus).")
    tls: str = option(
        "may", parse_choice("may", "none", "encrypt"),
        "STARTTLS policy for this domain: may, encrypt (required) or none.")
    dane: str = option(
        "outbound", parse_choice("outbound", "yes", "no"),
        "DANE (RFC 7672) for this domain's hosts (the relay's, when there is one: its "
        "name is trusted as configured, its addresses and TLSA records must be "
        "DNSSEC-validated): yes, no, or outbound (as [outbound] dane).  Never with "
        "tls = none.")
    auth_user: str = auth_user_option("this transport's relay")
    auth_password_file: Path | None = auth_password_file_option()
    auth_password: str = auth_password_field()


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether a strports description listens on loopback only: a Unix socket, or
    TCP with interface= a loopback address (tcp:PORT alone listens on all)."""
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    # strports escapes the colons of an IPv6 address: tcp6:25:interface=\:\:1
    items = re.split(r"(?<!\\):", rest)[1:]
    fields = dict(item.partition("=")[::2] for item in items if "=" in item)
    interface = fields.get("interface", "").replace("\\:", ":").strip("[]")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP listener (twisted.web): ``/metrics`` for Prometheus, ``/healthz``
    and ``/readyz`` for probes; the admin API will live there too.  Off unless
    enabled, as Dovecot's and Postfix's own listeners for tools are."""

    enabled: bool = option(
        False, parse_bool,
        "Run the admin HTTP listener in the main process.")
    endpoint: str = option(
        "tcp:8025:interface=127.0.0.1", parse_endpoint,
        "Where it listens (Twisted strports).  Off loopback (or a Unix socket) it needs "
        "token_file: the metrics would otherwise be open to the network.")
    token_file: Path | None = option(
        None, parse_optional_path,
        "File whose first line is the bearer token /metrics asks for (Authorization: "
        "Bearer TOKEN, as Prometheus' authorization setting sends it), read at start-up. "
        "Empty: /metrics answers anyone who reaches the listener (loopback only).  "
        "/healthz and /readyz never ask: they tell only up or not.")
    token: str = field(default="", repr=False, compare=False)
    readiness_timeout: float = option(
        2.0, parse_duration(minimum=0.1),
        "How long /readyz waits for the database to answer a trivial read.")


@dataclass(frozen=True)
class OAuthConfig:
    """OAuth 2.0 bearer tokens (JWTs) for OAUTHBEARER (RFC 7628) and XOAUTH2: LightMail
    checks them as a resource server, against the keys its issuer publishes."""

    issuer: str = option(
        "", parse_str,
        "The token issuer (the iss claim must be exactly this), e.g. "
        "https://id.example.com/realms/mail.  Needed when a mechanism in [directory] "
        "mechanisms is OAUTHBEARER or XOAUTH2.")
    audience: str = option(
        "", parse_str,
        "What the aud claim must name (the client id or resource the issuer puts there);"
        " empty: the aud claim is not checked.")
    jwks: str = option(
        "", parse_str,
        "The issuer's signing keys (a JWK Set): a file, or an https:// URL (as the "
        "issuer's jwks_uri) fetched off the main loop, cached, and fetched again after "
        "jwks_refresh or when a token names a key not yet known.")
    jwks_refresh: float = option(
        3600.0, parse_duration(minimum=10.0),
        "How long the keys are kept before they are fetched or read again.")
    user_claim: str = option(
        "email", parse_str,
        "The claim that holds the user's address (email, preferred_username, sub...).")
    algorithms: tuple[str, ...] = option(
        ("RS256", "PS256", "ES256", "EdDSA"), parse_list,
        "Signature algorithms accepted.  none and the HMAC ones (HS256...) never are: "
        "the keys are public.",
        shown_default="RS256 PS256 ES256 EdDSA")
    leeway: float = option(
        30.0, parse_duration(minimum=0.0),
        "Clock difference allowed when checking exp and nbf.")


@dataclass(frozen=True)
class ManholeConfig:
    """A Python prompt inside the running server (twisted.conch's manhole) over SSH,
    for an administrator who knows what the service tree is.  Off unless enabled;
    whoever logs in can do anything the server's user can."""

    enabled: bool = option(
        False, parse_bool, "Run the manhole's SSH listener in the main process.")
    endpoint: str = option(
        "tcp:8022:interface=127.0.0.1", parse_endpoint,
        "Where the SSH listener listens (Twisted strports).")
    authorized_keys: Path | None = option(
        None, parse_optional_path,
        "OpenSSH authorized_keys file: these public keys log in (under any user name, "
        "which is logged).")
    passwords_file: Path | None = option(
        None, parse_optional_path,
        "File of NAME:HASH lines, HASH an argon2 hash ('lightmail manhole-password "
        "NAME' prints such a line): these users log in with their password.  At least "
        "one of authorized_keys and passwords_file is needed.")
    host_key: Path | None = option(
        None, parse_optional_path,
        "The SSH host key (OpenSSH PEM private key); made (Ed25519, mode 0600) on "
        "first start if missing.", shown_default="STATE_DIR/manhole_host_key")
    telnet_endpoint: str = option(
        "", parse_endpoint,
        "Also a telnet listener (users of passwords_file; passwords cross in the "
        "clear), on loopback or a Unix socket only.  Empty: none.")


def parse_rate(raw: str, base: Path) -> tuple[int, float] | None:
    """N/DURATION (100/1h: 100 a hour, in bursts of up to 100), or 0 for no limit"""
    if raw.strip().lower() in ("0", "none", "no", ""):
        return None
    count, slash, period = raw.partition("/")
    if not slash or not count.strip().isdigit() or int(count) < 1:
        raise _BadValue(f"expected N/DURATION such as 100/1h, or 0; got {raw!r}")
    return int(count), parse_duration(minimum=1.0)(period, base)


def parse_redis(raw: str, base: Path) -> str:
    """HOST:PORT[/DB]"""
    if raw and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}(?:/\d{1,2})?", raw.strip()):
        raise _BadValue(f"expected HOST:PORT or HOST:PORT/DB, got {raw!r}")
    return raw.strip()


def parse_redis_user(raw: str, base: Path) -> str:
    """a Redis ACL user name (no spaces)"""
    if raw and not re.fullmatch(r"[^\s]{1,128}", raw):
        raise _BadValue(f"expected a user name without spaces, got {raw!r}")
    return raw


def parse_prefix(raw: str, base: Path) -> str:
    """letters, digits and : . _ - (a Redis key prefix)"""
    if not re.fullmatch(r"[\w:.\-]{1,64}", raw):
        raise _BadValue(f"expected letters, digits and ':._-' (at most 64), got {raw!r}")
    return raw


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes on one database (PostgreSQL or MariaDB, and one blob store): what
    they share besides it is in Redis, which holds only what may be lost.  Through
    it an IMAP session hears of the changes made on every node (IDLE, NOOP, the
    untagged EXISTS, EXPUNGE and FETCH), \\Recent is given to one session of all,
    [imap] max_connections_per_user and the POP3 maildrop lock hold across the
    nodes, and the login guard's failure counts ([directory]) are shared.  Rate
    limits and greylisting have their own Redis addresses ([limits], [greylist]).
    The redis_user ... redis_server_name keys say how LightMail reaches every Redis
    it uses (these three): as which user, and over TLS or not.  heartbeat,
    dead_after and drain_notice concern the database's nodes table and apply with or
    without Redis.  See "Several nodes" and "Links between nodes" in
    docs/operations.rst."""

    redis: str = option(
        "", parse_redis,
        "The Redis server of the nodes: HOST:PORT or HOST:PORT/DB.  Empty: this node "
        "is alone (its state is in its memory).", shown_default="(empty: one node)")
    redis_user: str = option(
        "", parse_redis_user,
        "The Redis ACL user LightMail logs in as (Redis 6 and later: AUTH USER "
        "PASSWORD), with the password of redis_password_file.  Empty: Redis's "
        "default user (AUTH PASSWORD).")
    redis_password_file: Path | None = option(
        None, parse_optional_path,
        "File holding the password of Redis (its first line; Redis's AUTH), read at "
        "start-up and never logged; used for every Redis LightMail uses ([cluster], "
        "[limits] and [greylist]).  Empty: no AUTH.")
    redis_tls: bool = option(
        False, parse_bool,
        "Speak TLS to Redis (its tls-port): the server's certificate is checked "
        "against redis_ca_file and must name redis_server_name.  For every Redis "
        "LightMail uses.")
    redis_ca_file: Path | None = option(
        None, parse_optional_path,
        "CA certificates (PEM) that Redis's certificate must chain to; empty: the "
        "system's.  With redis_tls.")
    redis_cert_file: Path | None = option(
        None, parse_optional_path,
        "A client certificate (PEM) to show Redis (its tls-auth-clients), with "
        "redis_key_file.  With redis_tls; empty: none.")
    redis_key_file: Path | None = option(
        None, parse_optional_path,
        "The private key (PEM) of redis_cert_file.")
    redis_server_name: str = option(
        "", parse_str,
        "The name Redis's certificate must carry (a DNS name or an IP address); "
        "empty: the HOST of each redis address.  With redis_tls.")
    prefix: str = option(
        "lightmail:", parse_prefix,
        "Start of every key and of the change channel's name: several clusters on one "
        "Redis each need their own (pub/sub channels are not per database).")
    redis_timeout: float = option(
        1.0, parse_duration(minimum=0.01),
        "Longest wait for an answer of Redis; past it Redis counts as down for that "
        "question (see docs/operations.rst for what is refused and what goes on).")
    lease: float = option(
        30.0, parse_duration(minimum=3.0),
        "How long a node's POP3 maildrop locks and IMAP session marks outlive it: the "
        "node renews them every third of this; a node that dies (kill -9, power) "
        "frees them after this long.")
    heartbeat: float = option(
        10.0, parse_duration(minimum=0.1),
        "How often this node writes its heartbeat into the database's nodes table "
        "(lightmail node list), and looks there for dead nodes whose queue leases it "
        "hands back.  Every node has its row, on every database (alone: harmless).")
    dead_after: float = option(
        0.0, parse_duration(minimum=0.0),
        "A node whose heartbeat is older than this is dead: another node hands its queue "
        "leases back (they are delivered at once rather than after the lease runs out), "
        "and its node_id may start elsewhere.  Longer than heartbeat.",
        shown_default="3 x heartbeat")
    drain_notice: float = option(
        0.0, parse_duration(minimum=0.0),
        "A draining node (SIGTERM, lightmail node drain) answers /readyz with 503 and "
        '"draining": true this long before it closes its listeners, so that a load '
        "balancer stops sending it connections first: set it to the balancer's check "
        "interval times its fall count (and a little more).  0: close at once (a node "
        "alone).")
    #: Read from redis_password_file by parse_config; never shown or logged.
    redis_password: str = field(default="", repr=False, compare=False)

    @property
    def node_dead_after(self) -> float:
        """``dead_after``, or three heartbeats when it is not set."""
        return self.dead_after or 3 * self.heartbeat


def _rate_option(what: str) -> Any:
    return option(None, parse_rate, f"At most this many {what} (N/DURATION), or 0 for "
                  "no limit.", shown_default="0 (no limit)")


@dataclass(frozen=True)
class LimitsConfig:
    """Rate limits of the ``limits`` inbound check (token buckets: N/DURATION lets N
    through at once, then N per DURATION).  Client limits apply to sessions that did
    not log in, user limits to those that did; trusted and allowlisted clients are not
    limited.  All are off by default, as Postfix's anvil rates are."""

    client_connections: tuple[int, float] | None = _rate_option(
        "connections from one client address (refused with 421 4.7.0 at connect)")
    client_messages: tuple[int, float] | None = _rate_option(
        "messages (MAIL FROM) from one client address")
    network_messages: tuple[int, float] | None = _rate_option(
        "messages from one client network (its /24, or /64 for IPv6)")
    client_recipients: tuple[int, float] | None = _rate_option(
        "recipients (RCPT TO) from one client address")
    user_messages: tuple[int, float] | None = _rate_option(
        "messages from one authenticated user")
    user_recipients: tuple[int, float] | None = _rate_option(
        "recipients from one authenticated user")
    sender_domain_messages: tuple[int, float] | None = _rate_option(
        "messages whose MAIL FROM is in one domain")
    recipient_domain_recipients: tuple[int, float] | None = _rate_option(
        "recipients in one domain")
    imap_commands: tuple[int, float] | None = _rate_option(
        "commands in one IMAP session: a session over it is slowed (its input waits "
        "until the rate allows the next command), not refused")
    pop3_commands: tuple[int, float] | None = _rate_option(
        "commands in one POP3 session, slowed as imap_commands")
    command_overrun: int = option(
        10, parse_int(2, 1000),
        "A session that keeps asking for this many times its command rate (longer "
        "than a burst of this many times the rate's N allows) is closed: * BYE or "
        "-ERR.")
    client_errors: tuple[int, float] | None = _rate_option(
        "failed commands from one client address, across its sessions (SMTP 5xx and "
        "421 replies, IMAP BAD, POP3 -ERR for a bad command; failed logins are the "
        "login guard's, [directory]): at the limit the session is closed and new "
        "connections from the address are refused until the bucket refills")
    backend: str = option(
        "local", parse_choice("local", "redis"),
        "Where the buckets are: local (in each process) or redis (shared by every "
        "process and node, at 'redis').")
    redis: str = option(
        "127.0.0.1:6379", parse_redis, "The Redis server of backend = redis: HOST:PORT "
        "or HOST:PORT/DB.")
    redis_timeout: float = option(
        0.5, parse_duration(minimum=0.01),
        "Longest wait for Redis; beyond it (or when it is down) redis_down applies, "
        "logged once until Redis answers again.")
    redis_down: str = option(
        "local", parse_choice("local", "none"),
        "While Redis does not answer: local (each process counts alone) or none (no "
        "limits).")


@dataclass(frozen=True)
class AccessConfig:
    """Trusted networks and the allow- and blocklists (lightmail/policy/access.py):
    the entries are in the database (``lightmail access``); these settings are the
    file's part."""

    trusted_networks: tuple[str, ...] = option(
        (), parse_networks,
        "Clients that may relay through the MX without AUTH and skip the checks meant "
        "for strangers (Postfix's mynetworks), besides the database's trusted "
        "entries.  Postfix trusts the host itself by default; LightMail trusts "
        "nobody until told.",
        shown_default="(none)")
    refresh: float = option(
        5.0, parse_duration(minimum=0.0),
        "How often each process reads the lists again: a change made with "
        "'lightmail access' is in force within this time.")


def parse_zones(raw: str, base: Path) -> tuple[Zone, ...]:
    """DNS list zones, ZONE[=PATTERN|&MASK][*WEIGHT], comma-separated"""
    from lightmail.policy.dnsbl import ZoneError, parse_zone
    zones = []
    for item in parse_list(raw, base):
        try:
            zones.append(parse_zone(item))
        except ZoneError as exc:
            raise _BadValue(str(exc)) from None
    return tuple(zones)


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting, on listeners whose checks name greylist (it is not among the
    default ones): the first attempt of a (client /24 or /64, sender, recipient)
    triplet gets 451 4.7.1, a retry after the delay passes.  Authenticated
    sessions, trusted and allowlisted clients and senders are not greylisted."""

    delay: float = option(
        300.0, parse_duration(minimum=0.0),
        "How long a new triplet waits: a retry before then is refused again (the "
        "wait does not start over).", shown_default="5m")
    unconfirmed_expiry: float = option(
        86400.0, parse_duration(minimum=1.0),
        "How long a triplet that was refused waits for its retry: one that comes "
        "later is new again.", shown_default="1d")
    confirmed_expiry: float = option(
        35 * 86400.0, parse_duration(minimum=1.0),
        "How long a triplet that passed (and a client network that was auto-allowed) "
        "is remembered after it was last seen.", shown_default="35d")
    auto_allow: int = option(
        5, parse_int(0),
        "After this many retries that passed, the client's network (its /24 or /64) "
        "is not greylisted any more (until it is unseen for confirmed_expiry); 0: "
        "never.")
    spf_pass_domains: tuple[str, ...] = option(
        (), parse_domains,
        "Sender domains (and their subdomains) that are not greylisted when SPF "
        "passed for them (the listener needs the spf check): large senders that "
        "retry from another address each time.",
        shown_default="(none)")
    store: str = option(
        "sql", parse_choice("sql", "redis"),
        "Where triplets are kept: sql (the database) or redis (at 'redis', keys "
        "expiring by themselves).")
    redis: str = option(
        "127.0.0.1:6379", parse_redis,
        "The Redis server of store = redis: HOST:PORT or HOST:PORT/DB.")
    redis_timeout: float = option(
        0.5, parse_duration(minimum=0.01),
        "Longest wait for Redis; beyond it (or when it is down) redis_down applies, "
        "logged once until Redis answers again.")
    redis_down: str = option(
        "accept", parse_choice("accept", "sql"),
        "While Redis does not answer: accept (no greylisting: the mail is not held "
        "up by our outage) or sql (the SQL store, whose triplets are not Redis's: "
        "every sender is new there).")


@dataclass(frozen=True)
class DNSBLConfig:
    """DNS blocklists (RFC 5782) of the dnsbl check: the client's address is looked up
    at connect, the sender's domain (and the HELO name) at MAIL FROM, in parallel
    and through the cached resolver; at RCPT TO the weights of the zones that list
    something are added up, and a score that reaches the threshold refuses each
    recipient with 550 5.7.1 naming the lists.  A lookup that times out or fails
    never refuses mail.  With no zones the check does nothing."""

    zones: tuple[Zone, ...] = option(
        (), parse_zones,
        "Zones listing client addresses (IPv4 reversed, IPv6 in nibbles): "
        "ZONE[=PATTERN|&MASK][*WEIGHT], e.g. zen.spamhaus.org=127.0.0.[2..11]*3, "
        "bl.spamcop.net*2, list.dnswl.org=127.0.[0..255].[1..3]*-5 (postscreen's "
        "syntax; a negative weight allowlists).  Without a pattern, any answer in "
        "127.0.0.0/8 counts except 127.255.255.x (a list refusing our queries).",
        shown_default="(none)")
    rhsbl_zones: tuple[Zone, ...] = option(
        (), parse_zones,
        "Zones listing domain names (RHSBL), asked about the MAIL FROM domain, in the "
        "same syntax: dbl.spamhaus.org=127.0.1.[2..99]*3.",
        shown_default="(none)")
    check_helo: bool = option(
        False, parse_bool, "Ask the rhsbl_zones about the HELO/EHLO name too.")
    threshold: int = option(
        1, parse_int(1),
        "The score (the sum of the weights of the zones that list the client, its "
        "HELO name or the sender's domain) that refuses the mail.")
    timeout: float = option(
        5.0, parse_duration(minimum=0.1),
        "Longest wait for a zone's answer; a zone that does not answer in time does "
        "not list anything (logged).")


@dataclass(frozen=True)
class ReverseConfig:
    """The reverse check: the client's name from its address's PTR records,
    forward-confirmed (one of those names has the address among its A or AAAA
    records).  Logged for every session (client=NAME[IP] fcrdns=pass|fail|none|
    temperror) and written as iprev in Authentication-Results; refused only when
    required.  Authenticated sessions, trusted and allowlisted clients are never
    refused."""

    require: str = option(
        "no", parse_choice("no", "ptr", "yes"),
        "no: only log; ptr: refuse clients without a PTR record (550 5.7.25, as "
        "Postfix's reject_unknown_reverse_client_hostname); yes: refuse those whose "
        "name does not resolve back to their address too (reject_unknown_client_"
        "hostname).  A DNS failure is a 450 4.7.25 (RFC 7372).  The refusal comes "
        "at RCPT TO.")
    timeout: float = option(
        5.0, parse_duration(minimum=0.1),
        "Longest wait for each lookup (the PTR, then the names' addresses); beyond "
        "it the result is temperror.")


@dataclass(frozen=True)
class TranscriptConfig:
    """Protocol transcripts of chosen sessions, for debugging (lightmail/transcripts/):
    what the client and the server said, with passwords, SASL exchanges and message
    content masked.  No session has one unless chosen here."""

    listeners: tuple[str, ...] = option(
        (), parse_list, "Listeners (their NAME) every session of which gets a transcript.")
    clients: tuple[str, ...] = option(
        (), parse_networks, "Client addresses or networks whose sessions get one.")
    users: tuple[str, ...] = option(
        (), parse_list,
        "Users whose sessions get one from their login on (what came before it is "
        "kept in memory until then: the last 200 writes).")
    directory: Path | None = option(
        None, parse_optional_path,
        "Where the transcripts go, a file per session (mode 0600; the directory is "
        "made 0700); empty: the log, as events of lightmail.transcript.")
    body_octets: int = option(
        0, parse_size(),
        "How much of each message's content (DATA, BDAT, APPEND, FETCH, RETR) a "
        "transcript shows; the rest only as its size.")


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry traces (lightmail/telemetry.py): a span per session and per
    accepted message, sent over OTLP/HTTP by a thread of their own."""

    otlp_endpoint: str = option(
        "", parse_str,
        "The OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces); empty: no "
        "tracing, and OpenTelemetry is not even imported.")
    service_name: str = option(
        "lightmail", parse_str, "The service.name resource attribute of the spans.")
    sample_ratio: float = option(
        1.0, parse_ratio, "The share of sessions traced (0 to 1; a message's span "
        "follows its session's).")


@dataclass(frozen=True)
class TLSRPTConfig:
    """SMTP TLS Reporting (RFC 8460, lightmail/tlsrpt/): the outcome of every outbound
    TLS negotiation (successes; STARTTLS, MTA-STS and DANE failures) counted per
    receiving domain and day, and a daily report sent to the addresses each domain
    publishes in its ``_smtp._tls`` TXT record (``lightmail tlsrpt send-reports``
    sends the complete days' reports at once)."""

    enabled: bool = option(
        False, parse_bool,
        "Record outbound TLS outcomes and send the daily reports.  Off by default: "
        "the reports go to other organisations, in your name.")
    interval: float = option(
        3600.0, parse_duration(minimum=60.0),
        "How often the report job looks for days to report: each UTC day is reported "
        "once it is over (and every node's counts of it are in: twice flush_interval "
        "later), at the job's next run.")
    flush_interval: float = option(
        60.0, parse_duration(minimum=1.0),
        "Outcomes are counted in memory and written to the database this often (and "
        "at shutdown): a crash loses at most that much of the count.")
    org_name: str = option(
        "", parse_str, "The organization-name of the reports; empty: the hostname.",
        shown_default="(the hostname)")
    from_address: str = option(
        "", parse_optional_address,
        "The From: address (and envelope sender) of report mail; its domain is the "
        "report submitter (TLS-Report-Submitter, RFC 8460 §5.3); empty: "
        "postmaster@ the hostname.", shown_default="postmaster@(the hostname)")
    contact: str = option(
        "", parse_str,
        "The contact-info of the reports (an address or a URI); empty: from_address.",
        shown_default="(from_address)")
    give_up_after: float = option(
        3 * 86400.0, parse_duration(minimum=3600.0),
        "A day's report for a domain whose TLS-RPT record cannot be looked up (DNS "
        "failure) is tried again at each run for this long after the day ended, "
        "then dropped.")
    http_timeout: float = option(
        60.0, parse_duration(minimum=1.0),
        "Longest wait for a report POSTed to an https: address (RFC 8460 §5.4).")

    def sender(self, hostname: str) -> str:
        """from_address as it applies."""
        return self.from_address or f"postmaster@{hostname}"


SECTIONS: Mapping[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "s3": S3Config,
    "cluster": ClusterConfig,
    "directory": DirectoryConfig,
    "logging": LoggingConfig,
    "smtp": SMTPConfig,
    "lmtp": LMTPConfig,
    "pop3": POP3Config,
    "imap": IMAPConfig,
    "outbound": OutboundConfig,
    "dkim": DKIMConfig,
    "spf": SPFConfig,
    "inbound": InboundConfig,
    "access": AccessConfig,
    "limits": LimitsConfig,
    "greylist": GreylistConfig,
    "dnsbl": DNSBLConfig,
    "reverse": ReverseConfig,
    "arc": ARCConfig,
    "srs": SRSConfig,
    "dmarc": DMARCConfig,
    "antivirus": AntivirusConfig,
    "spam": SpamConfig,
    "admin": AdminConfig,
    "manhole": ManholeConfig,
    "oauth": OAuthConfig,
    "transcript": TranscriptConfig,
    "telemetry": TelemetryConfig,
    "tlsrpt": TLSRPTConfig,
}
LISTENER_PREFIX = "listener:"
TRANSPORT_PREFIX = "transport:"
BACKEND_PREFIX = "backend:"
MILTER_PREFIX = "milter:"


@dataclass(frozen=True)
class DatabaseLink:
    """The metadata database: its SQLAlchemy URL, and from [storage] the password of
    its user (kept out of the URL) and TLS: the CA its certificate must chain to and a
    client certificate to show."""

    url: str
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    s3: S3Config = field(default_factory=S3Config)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    lmtp: LMTPConfig = field(default_factory=LMTPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    spf: SPFConfig = field(default_factory=SPFConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    dnsbl: DNSBLConfig = field(default_factory=DNSBLConfig)
    reverse: ReverseConfig = field(default_factory=ReverseConfig)
    arc: ARCConfig = field(default_factory=ARCConfig)
    srs: SRSConfig = field(default_factory=SRSConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    antivirus: AntivirusConfig = field(default_factory=AntivirusConfig)
    spam: SpamConfig = field(default_factory=SpamConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    manhole: ManholeConfig = field(default_factory=ManholeConfig)
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    transcript: TranscriptConfig = field(default_factory=TranscriptConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tlsrpt: TLSRPTConfig = field(default_factory=TLSRPTConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    transports: tuple[TransportConfig, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    milters: tuple[MilterConfig, ...] = ()
    #: The file's text as it was read: a reload (lightmail.reload) hands it to the
    #: worker processes, so that they run what the main process checked.
    text: str = field(default="", repr=False, compare=False)

    @property
    def database_url(self) -> str:
        return self.storage.url or f"sqlite:///{self.server.state_dir / 'lightmail.db'}"

    @property
    def database(self) -> DatabaseLink:
        """The metadata database and how it is reached ([storage]): what every engine
        is made from (lightmail.storage.database.create_engine)."""
        storage = self.storage
        return DatabaseLink(self.database_url, password=storage.password, tls=storage.tls,
                            ca_file=storage.ca_file, cert_file=storage.cert_file,
                            key_file=storage.key_file)

    @property
    def blob_dir(self) -> Path:
        return self.storage.blob_dir or self.server.state_dir / "blobs"

    @property
    def s3_spool_dir(self) -> Path:
        return self.s3.spool_dir or self.server.state_dir / "s3-spool"

    @property
    def hostname(self) -> str:
        return self.server.hostname or socket.getfqdn()

    @property
    def authserv_id(self) -> str:
        return self.inbound.authserv_id or self.hostname

    @property
    def node_id(self) -> str:
        return self.server.node_id or socket.gethostname()

    @property
    def srs_domain(self) -> str:
        return (self.srs.domain or self.hostname).lower().rstrip(".")

    @property
    def srs_secret_file(self) -> Path:
        return self.srs.secret_file or self.server.state_dir / "srs.secret"

    @property
    def manhole_host_key(self) -> Path:
        return self.manhole.host_key or self.server.state_dir / "manhole_host_key"


# --- parsing -----------------------------------------------------------------------

_SECTION_RE = re.compile(r"^\[(?P<name>[^\]]+)\]")
_KEY_RE = re.compile(r"^(?P<key>[^=:\s#;][^=:]*?)\s*[=:]")


def _line_index(text: str) -> dict[tuple[str, str | None], int]:
    """Map (section, key) and (section, None) to 1-based line numbers."""
    index: dict[tuple[str, str | None], int] = {}
    section: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(("#", ";")) or line[0].isspace():
            continue  # blank, comment, or a continuation line
        if match := _SECTION_RE.match(line):
            section = match.group("name").strip()
            index.setdefault((section, None), number)
        elif section is not None and (match := _KEY_RE.match(line)):
            index.setdefault((section, match.group("key").strip().lower()), number)
    return index


def _options(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if "parser" in f.metadata}


def _build_section(cls: type, items: Mapping[str, str], section: str, path: str,
                   lines: Mapping[tuple[str, str | None], int], base: Path,
                   extra: Mapping[str, Any] | None = None) -> Any:
    known = _options(cls)
    values: dict[str, Any] = dict(extra or {})
    for key, raw in items.items():
        line = lines.get((section, key), lines.get((section, None)))
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            message = f"unknown key '{key}'"
            if hint:
                message += f"; did you mean '{hint[0]}'?"
            else:
                message += f"; known keys are: {', '.join(sorted(known))}"
            raise ConfigError(message, path, line, section, key)
        try:
            values[key] = known[key].metadata["parser"](raw.strip(), base)
        except _BadValue as exc:
            raise ConfigError(str(exc), path, line, section, key) from None
    return cls(**values)


def parse_config(text: str, path: str = "<config>",
                 validators: Callable[[Config], None] | None = None) -> Config:
    """Parse config ``text`` read from ``path``; raise ConfigError on any problem."""
    base = Path(path).resolve().parent if not path.startswith("<") else Path.cwd()
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        default_section="\0no-default-section")
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError("a key appears before any [section] header", path,
                          exc.lineno) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError("this section appears twice", path, exc.lineno,
                          exc.section) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError("this key appears twice in the section", path, exc.lineno,
                          exc.section, exc.option) from None
    except configparser.ParsingError as exc:
        lineno, bad = exc.errors[0]
        raise ConfigError(f"cannot read line {bad!r}: expected 'key = value' or "
                          "'[section]'", path, lineno) from None

    lines = _line_index(text)
    sections: dict[str, Any] = {}
    listeners: list[ListenerConfig] = []
    transports: list[TransportConfig] = []
    backends: list[BackendConfig] = []
    milters: list[MilterConfig] = []
    for name in parser.sections():
        items = dict(parser.items(name))
        if name in SECTIONS:
            sections[name] = _build_section(SECTIONS[name], items, name, path, lines, base)
        elif name.startswith(LISTENER_PREFIX) and name[len(LISTENER_PREFIX):].strip():
            listener = _build_section(ListenerConfig, items, name, path, lines, base,
                                      extra={"name": name[len(LISTENER_PREFIX):].strip()})
            _check_listener(listener, path, lines)
            listeners.append(listener)
        elif name.startswith(TRANSPORT_PREFIX) and name[len(TRANSPORT_PREFIX):].strip():
            domain = name[len(TRANSPORT_PREFIX):].strip().lower()
            transports.append(_build_section(TransportConfig, items, name, path, lines,
                                             base, extra={"domain": domain}))
            if transports[-1].protocol == "lmtp" and not transports[-1].relay:
                raise ConfigError("protocol = lmtp needs 'relay' (the LMTP server)", path,
                                  lines.get((name, "protocol")), name, "relay")
        elif name.startswith(BACKEND_PREFIX) and name[len(BACKEND_PREFIX):].strip():
            backend = _build_section(BackendConfig, items, name, path, lines, base,
                                     extra={"name": name[len(BACKEND_PREFIX):].strip()})
            backends.append(_check_backend(backend, backends, path, lines))
        elif name.startswith(MILTER_PREFIX) and name[len(MILTER_PREFIX):].strip():
            milter = _build_section(MilterConfig, items, name, path, lines, base,
                                    extra={"name": name[len(MILTER_PREFIX):].strip()})
            if not milter.socket:
                raise ConfigError("every milter needs 'socket'", path,
                                  lines.get((name, None)), name, "socket")
            milters.append(milter)
        else:
            known = list(SECTIONS) + [LISTENER_PREFIX + "NAME", TRANSPORT_PREFIX + "DOMAIN",
                                      BACKEND_PREFIX + "NAME", MILTER_PREFIX + "NAME"]
            raise ConfigError(f"unknown section; known sections are {', '.join(known)}",
                              path, lines.get((name, None)), name)
    if "outbound" in sections:
        sections["outbound"] = _load_password(sections["outbound"], "outbound", path, lines)
    transports = [_load_password(t, TRANSPORT_PREFIX + t.domain, path, lines)
                  for t in transports]
    if "cluster" in sections:
        sections["cluster"] = _check_cluster(sections["cluster"],
                                             sections.get("limits", LimitsConfig()),
                                             sections.get("greylist", GreylistConfig()),
                                             path, lines)
        _check_heartbeat(sections["cluster"], path, lines)
    if "admin" in sections:
        sections["admin"] = _check_admin(sections["admin"], path, lines)
    if "storage" in sections:
        sections["storage"] = _check_storage(sections["storage"], path, lines)
    sections["s3"] = _check_s3(sections.get("s3", S3Config()), sections.get("storage"),
                               path, lines)
    if "manhole" in sections:
        _check_manhole(sections["manhole"], path, lines)
    _check_oauth(sections.get("oauth", OAuthConfig()), sections.get("directory"), path,
                 lines)
    config = Config(path=path, listeners=tuple(listeners), transports=tuple(transports),
                    backends=tuple(backends), milters=tuple(milters), text=text,
                    **sections)
    if validators is not None:
        validators(config)
    return config


def _load_password(section_config: Any, section: str, path: str,
                   lines: Mapping[tuple[str, str | None], int]) -> Any:
    """Read ``auth_password_file`` (SMTP AUTH to a relay) into ``auth_password``."""
    user, secret = section_config.auth_user, section_config.auth_password_file
    if not user and secret is None:
        return section_config
    if not user:
        raise ConfigError("auth_password_file needs 'auth_user'", path,
                          lines.get((section, "auth_password_file")), section, "auth_user")
    if secret is None:
        raise ConfigError("auth_user needs 'auth_password_file'", path,
                          lines.get((section, "auth_user")), section, "auth_password_file")
    line = lines.get((section, "auth_password_file"))
    try:
        text = secret.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {secret}: {exc.strerror}", path, line, section,
                          "auth_password_file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{secret} is not UTF-8 text", path, line, section,
                          "auth_password_file") from None
    password = text.splitlines()[0] if text.splitlines() else ""
    if not password:
        raise ConfigError(f"{secret} holds no password (an empty first line)", path,
                          line, section, "auth_password_file")
    return dataclasses.replace(section_config, auth_password=password)


def _first_line(secret: Path, path: str, line: int | None, section: str,
                key: str) -> str:
    """The first line of the file ``secret`` names (a password, a token)."""
    try:
        text = secret.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {secret}: {exc.strerror}", path, line, section,
                          key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{secret} is not UTF-8 text", path, line, section,
                          key) from None
    first = text.splitlines()[0].strip() if text.splitlines() else ""
    if not first:
        raise ConfigError(f"{secret} holds nothing (an empty first line)", path, line,
                          section, key)
    return first


def _check_storage(storage: StorageConfig, path: str,
                   lines: Mapping[tuple[str, str | None], int]) -> StorageConfig:
    """The database link's keys: for a server (not SQLite's file); the TLS files
    checked, the password read (at start-up)."""
    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, path, lines.get(("storage", key)), "storage", key)
    given = [key for key in ("password_file", "tls", "ca_file", "cert_file", "key_file")
             if getattr(storage, key)]
    if given and (not storage.url or storage.url.startswith("sqlite")):
        raise fail("for PostgreSQL and MariaDB: SQLite is a file, reached by no link",
                   given[0])
    if not storage.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            if key in given:
                raise fail("a TLS setting: it needs tls = yes", key)
    _check_tls_files("storage", "", storage.ca_file, storage.cert_file, storage.key_file,
                     path, lines)
    if storage.password_file is None:
        return storage
    password = _first_line(storage.password_file, path,
                           lines.get(("storage", "password_file")), "storage",
                           "password_file")
    return dataclasses.replace(storage, password=password)


#: The [cluster] keys that say how every Redis is reached (none is used alone).
REDIS_LINK_KEYS = ("redis_user", "redis_password_file", "redis_tls", "redis_ca_file",
                   "redis_cert_file", "redis_key_file", "redis_server_name")


def _check_cluster(cluster: ClusterConfig, limits: LimitsConfig, greylist: GreylistConfig,
                   path: str, lines: Mapping[tuple[str, str | None], int]) -> ClusterConfig:
    """The Redis link's keys: each given one is used (a Redis is), the files are read
    (the password, at start-up) or checked (TLS: certificates and key parse, and the
    key is the certificate's)."""
    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, path, lines.get(("cluster", key)), "cluster", key)
    given = [key for key in REDIS_LINK_KEYS if getattr(cluster, key)]
    used = cluster.redis or limits.backend == "redis" or greylist.store == "redis"
    if given and not used:
        raise fail("applies to no Redis: none is used ([cluster] redis, [limits] backend "
                   "= redis or [greylist] store = redis)", given[0])
    if cluster.redis_user and cluster.redis_password_file is None:
        raise fail("needs redis_password_file (the user's password)", "redis_user")
    if not cluster.redis_tls:
        for key in ("redis_ca_file", "redis_cert_file", "redis_key_file",
                    "redis_server_name"):
            if key in given:
                raise fail("a TLS setting: it needs redis_tls = yes", key)
    _check_tls_files("cluster", "redis_", cluster.redis_ca_file, cluster.redis_cert_file,
                     cluster.redis_key_file, path, lines)
    if cluster.redis_password_file is None:
        return cluster
    password = _first_line(cluster.redis_password_file, path,
                           lines.get(("cluster", "redis_password_file")), "cluster",
                           "redis_password_file")
    return dataclasses.replace(cluster, redis_password=password)


def _check_tls_files(section: str, prefix: str, ca_file: Path | None,
                     cert_file: Path | None, key_file: Path | None, path: str,
                     lines: Mapping[tuple[str, str | None], int]) -> None:
    """A link's TLS files, checked at start-up: PREFIXca_file holds PEM certificates,
    PREFIXcert_file and PREFIXkey_file come together, and the key is the
    certificate's (a mistake said here, with its line, rather than at the first
    connection)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def fail(message: str, key: str) -> ConfigError:
        key = prefix + key
        return ConfigError(message, path, lines.get((section, key)), section, key)

    def read(file: Path, key: str) -> bytes:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise fail(f"cannot read {file}: {exc.strerror}", key) from None
    if ca_file is not None:
        try:
            x509.load_pem_x509_certificates(read(ca_file, "ca_file"))
        except ValueError:
            raise fail(f"{ca_file} holds no PEM certificate", "ca_file") from None
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise fail(f"{prefix}cert_file and {prefix}key_file go together", missing)
    if cert_file is None or key_file is None:
        return
    try:
        cert = x509.load_pem_x509_certificates(read(cert_file, "cert_file"))[0]
    except ValueError:
        raise fail(f"{cert_file} holds no PEM certificate", "cert_file") from None
    try:
        key = serialization.load_pem_private_key(read(key_file, "key_file"), None)
    except (ValueError, TypeError):
        raise fail(f"{key_file} holds no PEM private key (without a passphrase)",
                   "key_file") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != cert.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise fail(f"{key_file} is not the key of the certificate {cert_file}",
                   "key_file")


def _check_heartbeat(cluster: ClusterConfig, path: str,
                     lines: Mapping[tuple[str, str | None], int]) -> None:
    # Unset, dead_after is three heartbeats: only a dead_after given can be too short.
    if cluster.node_dead_after <= cluster.heartbeat:
        raise ConfigError(
            f"must be longer than heartbeat ({cluster.heartbeat:g}s), got "
            f"{cluster.dead_after:g}s: a live node would be taken for dead between two "
            "of its heartbeats", path, lines.get(("cluster", "dead_after")), "cluster",
            "dead_after")


def _check_admin(admin: AdminConfig, path: str,
                 lines: Mapping[tuple[str, str | None], int]) -> AdminConfig:
    if admin.token_file is not None:
        token = _first_line(admin.token_file, path, lines.get(("admin", "token_file")),
                            "admin", "token_file")
        return dataclasses.replace(admin, token=token)
    if admin.enabled and not is_loopback_endpoint(admin.endpoint):
        raise ConfigError("an admin listener off loopback needs token_file (the metrics "
                          "would be open to the network)", path,
                          lines.get(("admin", "endpoint"), lines.get(("admin", None))),
                          "admin", "endpoint")
    return admin


def _check_s3(s3: S3Config, storage: StorageConfig | None, path: str,
              lines: Mapping[tuple[str, str | None], int]) -> S3Config:
    """What blob_backend = s3 needs: a bucket and credentials.  The secret is read
    whenever the file is named (``lightmail blobs migrate --to s3`` uses the section
    before blob_backend says s3)."""
    if storage is None or storage.blob_backend != "s3":
        if s3.secret_key_file is None:
            return s3
        return dataclasses.replace(s3, secret_key=_first_line(
            s3.secret_key_file, path, lines.get(("s3", "secret_key_file")), "s3",
            "secret_key_file"))

    def fail(message: str, key: str) -> ConfigError:
        line = lines.get(("s3", key), lines.get(("s3", None),
                                                 lines.get(("storage", "blob_backend"))))
        return ConfigError(message, path, line, "s3", key)
    if not s3.bucket:
        raise fail("blob_backend = s3 needs [s3] bucket", "bucket")
    if not s3.access_key or s3.secret_key_file is None:
        raise fail("blob_backend = s3 needs [s3] access_key and secret_key_file (the "
                   "credentials come from the configuration, nowhere else)",
                   "access_key" if not s3.access_key else "secret_key_file")
    if s3.part_size > s3.multipart_threshold:
        raise fail("part_size is larger than multipart_threshold", "part_size")
    if s3.ca_file is not None and not s3.ca_file.is_file():
        raise fail(f"no such file: {s3.ca_file}", "ca_file")
    secret = _first_line(s3.secret_key_file, path, lines.get(("s3", "secret_key_file")),
                         "s3", "secret_key_file")
    return dataclasses.replace(s3, secret_key=secret)


BEARER_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")


def _check_oauth(oauth: OAuthConfig, directory: DirectoryConfig | None, path: str,
                 lines: Mapping[tuple[str, str | None], int]) -> None:
    wanted = [m for m in (directory or DirectoryConfig()).mechanisms
              if m in BEARER_MECHANISMS]
    if not wanted:
        return
    for key in ("issuer", "jwks"):
        if not getattr(oauth, key):
            raise ConfigError(f"{wanted[0]} is offered ([directory] mechanisms) but "
                              f"[oauth] {key} is not set: tokens cannot be checked", path,
                              lines.get(("oauth", key), lines.get(("directory",
                                                                   "mechanisms"))),
                              "oauth", key)
    bad = [a for a in oauth.algorithms if a.lower() == "none" or a.upper().startswith("HS")]
    if bad:
        raise ConfigError(f"algorithm {bad[0]} is not accepted: none and HMAC (HS*) would "
                          "let anyone make tokens", path, lines.get(("oauth", "algorithms")),
                          "oauth", "algorithms")


def _check_manhole(manhole: ManholeConfig, path: str,
                   lines: Mapping[tuple[str, str | None], int]) -> None:
    def error(message: str, key: str) -> ConfigError:
        return ConfigError(message, path, lines.get(("manhole", key),
                                                    lines.get(("manhole", None))),
                           "manhole", key)
    if manhole.telnet_endpoint and not is_loopback_endpoint(manhole.telnet_endpoint):
        raise error("telnet sends passwords in the clear: only on loopback (tcp:PORT:"
                    "interface=127.0.0.1) or a Unix socket", "telnet_endpoint")
    if not manhole.enabled:
        return
    if manhole.authorized_keys is None and manhole.passwords_file is None:
        raise error("the manhole needs authorized_keys or passwords_file: it never "
                    "lets anyone in without credentials", "enabled")
    if manhole.telnet_endpoint and manhole.passwords_file is None:
        raise error("telnet logs in with passwords: it needs passwords_file",
                    "telnet_endpoint")
    for key in ("authorized_keys", "passwords_file"):
        file = getattr(manhole, key)
        if file is not None and not file.is_file():
            raise error(f"no such file: {file}", key)


def _check_backend(backend: BackendConfig, earlier: list[BackendConfig], path: str,
                   lines: Mapping[tuple[str, str | None], int]) -> BackendConfig:
    """What one [backend:NAME] needs for its type; its bind password read."""
    section = BACKEND_PREFIX + backend.name

    def fail(message: str, key: str | None, at: str | None = None) -> ConfigError:
        """The error about ``key``, on the line of ``at`` (the key that needs it)."""
        line = lines.get((section, at or key), lines.get((section, None)))
        return ConfigError(message, path, line, section, key)
    if not backend.type:
        raise fail("every backend needs 'type' (ldap or passwd-file)", "type")
    if not backend.domains:
        raise fail("every backend needs 'domains' (the domains whose users it holds)",
                   "domains")
    for other in earlier:
        for domain in set(backend.domains) & set(other.domains):
            raise fail(f"{domain} is served by [backend:{other.name}] already", "domains")
    if backend.type == "passwd-file":
        for key in _LDAP_ONLY:
            if (section, key) in lines:
                raise fail(f"{key} is an LDAP setting; this backend is a passwd-file", key)
        if backend.path is None:
            raise fail("type = passwd-file needs 'path'", "path", at="type")
        if not backend.path.is_file():
            raise fail(f"cannot read {backend.path}: no such file", "path")
        return backend
    if (section, "path") in lines:
        raise fail("path is a passwd-file setting; this backend is ldap", "path")
    for key in ("uri", "base"):
        if not getattr(backend, key):
            raise fail(f"type = ldap needs '{key}'", key)
    if backend.uri.lower().startswith("ldaps:") and (section, "starttls") in lines \
            and backend.starttls:
        raise fail("starttls is for ldap:// uris; an ldaps:// one is TLS from the start",
                   "starttls")
    if backend.ca_file is not None and not backend.ca_file.is_file():
        raise fail(f"cannot read {backend.ca_file}: no such file", "ca_file")
    if backend.auth == "bind" and not backend.user_dn:
        raise fail("auth = bind needs 'user_dn' (e.g. uid=%n,ou=people,dc=example,dc=com)",
                   "user_dn", at="auth")
    secret = backend.bind_password_file
    if backend.bind_dn and secret is None:
        raise fail("bind_dn needs 'bind_password_file'", "bind_password_file", at="bind_dn")
    if secret is None:
        return backend
    if not backend.bind_dn:
        raise fail("bind_password_file needs 'bind_dn'", "bind_dn", at="bind_password_file")
    try:
        first = secret.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {secret}: {getattr(exc, 'strerror', None) or exc}",
                   "bind_password_file") from None
    if not first or not first[0]:
        raise fail(f"{secret} holds no password (an empty first line)",
                   "bind_password_file")
    return dataclasses.replace(backend, bind_password=first[0])


def _check_listener(listener: ListenerConfig, path: str,
                    lines: Mapping[tuple[str, str | None], int]) -> None:
    section = LISTENER_PREFIX + listener.name
    for key in ("protocol", "endpoint"):
        if not getattr(listener, key):
            raise ConfigError(f"every listener needs '{key}'", path,
                              lines.get((section, None)), section, key)
    if listener.tls != "none":
        for key in ("tls_cert", "tls_key"):
            if getattr(listener, key) is None:
                raise ConfigError(f"tls = {listener.tls} needs '{key}'", path,
                                  lines.get((section, "tls")), section, key)
    if listener.proxy_protocol != "no" and not listener.proxy_from:
        raise ConfigError(f"proxy_protocol = {listener.proxy_protocol} needs 'proxy_from' "
                          "(the load balancers' addresses: nobody else is believed)",
                          path, lines.get((section, "proxy_protocol")), section,
                          "proxy_from")
    if listener.proxy_from and listener.proxy_protocol == "no":
        raise ConfigError("proxy_from is set but proxy_protocol = no: say which header "
                          "the load balancers send (v1, v2 or any)", path,
                          lines.get((section, "proxy_from")), section, "proxy_protocol")
    if listener.proxy_protocol != "no" and listener.endpoint.startswith("unix:"):
        raise ConfigError("proxy_protocol on a Unix socket: its clients have no address "
                          "to check against proxy_from (listen on TCP)", path,
                          lines.get((section, "proxy_protocol")), section,
                          "proxy_protocol")


def load_config(path: str | Path,
                validators: Callable[[Config], None] | None = None) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the config file is not UTF-8 text ({exc.reason})",
                          str(path)) from None
    return parse_config(text, str(path), validators)


def line_of(config: Config, section: str, key: str | None = None) -> int | None:
    """Best-effort line number of ``section``/``key`` in the file ``config`` came from."""
    try:
        text = Path(config.path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = _line_index(text)
    return lines.get((section, key), lines.get((section, None)))


def line_of_text(config: Config, section: str, key: str, text: str) -> int | None:
    """The line of ``text`` within the value of ``section``/``key`` (which may go on
    over continuation lines); else the key's line."""
    first = line_of(config, section, key)
    if first is None or not text:
        return first
    lines = Path(config.path).read_text(encoding="utf-8").splitlines()
    for number in range(first, len(lines) + 1):
        line = lines[number - 1]
        if number > first and line.strip() and not line[0].isspace():
            break               # the next key or section
        if text in line:
            return number
    return first


def reference_text() -> str:
    """The configuration reference in reStructuredText, generated from the schema."""
    out = ["Configuration reference", "=======================", "",
           ".. This file is generated by 'lightmail config-reference'; edit "
           "lightmail/config.py instead.", ""]
    blocks: list[tuple[str, type]] = list(SECTIONS.items())
    blocks.append((LISTENER_PREFIX + "NAME", ListenerConfig))
    blocks.append((TRANSPORT_PREFIX + "DOMAIN", TransportConfig))
    blocks.append((BACKEND_PREFIX + "NAME", BackendConfig))
    blocks.append((MILTER_PREFIX + "NAME", MilterConfig))
    for name, cls in blocks:
        title = f"[{name}]"
        out += [title, "-" * len(title), ""]
        for key, f in _options(cls).items():
            meta = f.metadata
            default = meta["shown_default"]
            if default is None:
                default = _show(f.default)
            out += [f"``{key}``", f"   {meta['help']}", "",
                    f"   *Type:* {meta['parser'].__doc__}.  *Default:* ``{default}``", ""]
    return "\n".join(out) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)
