"""A private OpenLDAP slapd (Debian's) for tests: its own slapd.conf, an mdb database
in a temporary directory, TLS with a test CA, on free ports (ldap:// with StartTLS and
ldaps://), and a DIT made here with ldapadd.  Stopped at the end of the test.

The DIT (suffix dc=example,dc=test) has a service account LightMail searches as, and
users in ou=people with inetOrgPerson + inetLocalMailRecipient (misc.schema:
mailLocalAddress for aliases) + a two-attribute test schema for the quota and the
enabled flag (OIDs under OpenLDAP's example arc, 1.3.6.1.4.1.4203.666).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.harness import free_ports
from tests.testca import TestCA

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
SERVICE_DN = f"cn=lightmail,ou=services,{SUFFIX}"
SERVICE_PW = "service-secret"
PEOPLE = f"ou=people,{SUFFIX}"

TEST_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.99.1.1 NAME 'mailQuota'
    DESC 'LightMail tests: mailbox quota in bytes'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.99.1.2 NAME 'mailEnabled'
    DESC 'LightMail tests: may log in and receive mail'
    EQUALITY booleanMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.7 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.99.2.1 NAME 'lightmailTestUser' SUP top AUXILIARY
    MAY ( mailQuota $ mailEnabled ) )
"""


def slappasswd(secret: str, scheme: str = "{SSHA}") -> str:
    args = ["slappasswd", "-s", secret, "-h", scheme]
    if scheme == "{CRYPT}":
        args += ["-c", "$6$%.16s"]          # SHA-512 crypt from the C library
    return subprocess.run(args, capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def _slapd() -> str:
    found = shutil.which("slapd") or ("/usr/sbin/slapd" if Path("/usr/sbin/slapd").exists()
                                       else None)
    if found is None:
        raise AssertionError("slapd is missing: run scripts/test-peers.sh")
    return found


class Slapd:
    def __init__(self, root: Path, ca: TestCA) -> None:
        self.root = root
        self.ca = ca
        self.port, self.tls_port = free_ports(2)
        self.uri = f"ldap://localhost:{self.port}"
        self.ldaps_uri = f"ldaps://localhost:{self.tls_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "db").mkdir(exist_ok=True)
        cert, key = ca.issue("localhost")
        (root / "test.schema").write_text(TEST_SCHEMA)
        schemas = "\n".join(f"include /etc/ldap/schema/{name}.schema"
                            for name in ("core", "cosine", "inetorgperson", "misc"))
        (root / "slapd.conf").write_text(f"""\
{schemas}
include {root / 'test.schema'}
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root / 'slapd.pid'}
argsfile {root / 'slapd.args'}
TLSCACertificateFile {ca.ca_file}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 33554432
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {slappasswd(ROOT_PW)}
directory {root / 'db'}
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    by self read
    by * none
""")

    def start(self) -> None:
        conf = self.root / "slapd.conf"
        # slaptest -u: the configuration checked (the database is made at start).
        checked = subprocess.run([_slapd(), "-T", "test", "-u", "-f", str(conf)],
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        log = (self.root / "slapd.log").open("ab")
        # -d keeps slapd in the foreground (killed by the test); stats: one line per
        # operation, for a failing test to show.
        self.proc = subprocess.Popen(
            [_slapd(), "-f", str(conf), "-d", "stats",
             "-h", f"ldap://localhost:{self.port}/ ldaps://localhost:{self.tls_port}/"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()                 # slapd has its own copy
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("localhost", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("slapd did not start:\n" + self.log()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        path = self.root / "slapd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def add(self, ldif: str) -> None:
        """Add entries (as the root DN, over plain LDAP: the test's own set-up)."""
        result = subprocess.run(
            ["ldapadd", "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr + self.log()

    def modify(self, ldif: str) -> None:
        result = subprocess.run(
            ["ldapmodify", "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr + self.log()


def user(uid: str, mail: str, password: str, *, aliases: tuple[str, ...] = (),
         quota: int | None = None, enabled: bool | None = True,
         scheme: str = "{SSHA}") -> str:
    lines = [f"dn: uid={uid},{PEOPLE}", "objectClass: inetOrgPerson",
             "objectClass: inetLocalMailRecipient", "objectClass: lightmailTestUser",
             f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", f"mail: {mail}",
             f"userPassword: {slappasswd(password, scheme)}"]
    lines += [f"mailLocalAddress: {alias}" for alias in aliases]
    if quota is not None:
        lines.append(f"mailQuota: {quota}")
    if enabled is not None:
        lines.append(f"mailEnabled: {'TRUE' if enabled else 'FALSE'}")
    return "\n".join(lines) + "\n\n"


def base_dit() -> str:
    return f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: lightmail
userPassword: {slappasswd(SERVICE_PW)}

"""
