"""LightMail's own DKIM signature check (lightmail/policy/dkimsignature.py) against
dkimpy as the reference: canonicalization on generated messages full of the corner
cases (blank runs, tabs, trailing blanks and empty lines, bare LF, folded fields,
empty bodies), every c= combination, l=, repeated and absent signed fields; then the
rules of RFC 6376 §3.5/§3.6 and RFC 8301 on tags and key records.  Signatures made by
OpenDKIM are checked in test_inbound_policy.py."""

from __future__ import annotations

import base64
import random
import time
from typing import Any, Optional

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from test_dkim import MESSAGE

from lightmail.policy import dkimsignature as ds
from lightmail.policy.dkim import Signer, dns_record, generate_key, signing_key

RSA_PEM, RSA_KEY = generate_key("rsa", 1024)
_, ED_KEY = generate_key("ed25519")
RSA_RECORD = dns_record(signing_key("example.org", "sel", RSA_KEY)).encode()
ED_RECORD = dns_record(signing_key("example.org", "ed", ED_KEY)).encode()


def dkimpy_sign(message: bytes, canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
                **options: Any) -> bytes:
    signed: bytes = dkim.sign(message, b"sel", b"example.org", RSA_PEM, canonicalize=canon,
                              **options)
    return signed + message


def dkimpy_verdict(message: bytes) -> bool:
    def records(name: bytes, timeout: float = 5) -> Optional[bytes]:
        return {b"sel._domainkey.example.org.": RSA_RECORD,
                b"ed._domainkey.example.org.": ED_RECORD}.get(name)
    try:
        return bool(dkim.DKIM(message).verify(dnsfunc=records))
    except dkim.DKIMException:
        return False


def ours(message: bytes, record: Optional[bytes] = None, index: int = 0,
         **options: Any) -> ds.Verdict:
    block, body = ds.split_message(ds.normalised(message))
    fields = ds.header_fields(block)
    signatures = [n for n, f in enumerate(fields) if f.name.lower() == b"dkim-signature"]
    tags = ds.tag_list(fields[signatures[index]].raw.split(b":", 1)[1])
    assert tags is not None
    if record is None:
        record = ED_RECORD if tags.get(b"a") == b"ed25519-sha256" else RSA_RECORD
    return ds.check(fields, body, signatures[index], tags, ds.parse_key(record), 1024,
                    **options)


# --- canonicalization and hashes against dkimpy ----------------------------------------

PIECES = [b"a", b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n", b"\r\n\r\n",
          b"\n", b".", b"=", b"\xc3\xa9"]


def random_body(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))


def random_header(rng: random.Random) -> bytes:
    subject = b"".join(rng.choice([b"x", b" ", b"\t", b"  y", b"\r\n z", b"\r\n\t"])
                       for _ in range(rng.randrange(1, 8)))
    fields = [b"From: Bob <bob@example.org>\r\n", b"To:  alice@remote.test \r\n",
              b"Subject:" + subject.rstrip(b"\r\n ") + b"\r\n",
              b"X-Twice: one\r\n", b"X-Twice:\ttwo \r\n"]
    rng.shuffle(fields)
    return b"".join(fields)


CANONS = [(h, b) for h in (b"simple", b"relaxed") for b in (b"simple", b"relaxed")]


@pytest.mark.parametrize("canon", CANONS, ids=lambda c: b"/".join(c).decode())
def test_generated_messages_verify_as_dkimpy_says(canon: tuple[bytes, bytes]) -> None:
    rng = random.Random(b"/".join(canon))
    for _ in range(60):
        message = random_header(rng) + b"\r\n" + random_body(rng)
        length = rng.random() < 0.3
        signed = dkimpy_sign(message, canon, include_headers=[
            b"from", b"to", b"subject", b"x-twice", b"x-twice", b"x-twice", b"cc"],
            length=length)
        assert dkimpy_verdict(signed)
        assert ours(signed).result == "pass", signed
        # Changes relaxed canonicalization forgives or not, and bodies appended
        # beyond l=: the verdicts must agree with dkimpy's.
        for changed in (signed.replace(b"  ", b" "), signed.replace(b"\t", b" "),
                        signed + b"\r\n\r\n", signed + b"more\r\n",
                        signed.replace(b"X-Twice: one", b"X-Twice: 1"),
                        signed.replace(b"\r\n\r\n", b"\r\nCc: c@example.org\r\n\r\n", 1)):
            assert (ours(changed).result == "pass") == dkimpy_verdict(changed), changed


@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n", b" \r\n", b"a", b"a \t",
                                  b"a\r\n\r\n\r\n", b"\t\r\n \r\n"])
@pytest.mark.parametrize("canon", CANONS, ids=lambda c: b"/".join(c).decode())
def test_empty_and_blank_bodies(body: bytes, canon: tuple[bytes, bytes]) -> None:
    signed = dkimpy_sign(b"From: bob@example.org\r\n\r\n" + body, canon)
    assert ours(signed).result == "pass"


def test_canonical_bodies_match_dkimpy() -> None:
    from dkim.canonicalization import Relaxed, Simple
    rng = random.Random(7)
    for _ in range(500):
        body = ds.normalised(random_body(rng))
        assert ds.canonical_body(body, False) == Simple.canonicalize_body(body)
        assert ds.canonical_body(body, True) == Relaxed.canonicalize_body(body)


@pytest.mark.parametrize("canon", CANONS, ids=lambda c: b"/".join(c).decode())
def test_blanks_before_a_colon_and_the_name_case(canon: tuple[bytes, bytes]) -> None:
    """RFC 6376 §3.4.2: relaxed drops blanks before the colon and lowers the name
    (dkimpy cannot read ``Subject :`` at all, hence not compared with it)."""
    changed = dkimpy_sign(MESSAGE, canon).replace(b"Subject:", b"subject :")
    assert ours(changed).result == ("pass" if canon[0] == b"relaxed" else "fail")


def test_ed25519_and_lf_only_messages() -> None:
    # LightMail's signer hands dkimpy the Ed25519 key in the form it wants.
    signed = Signer([signing_key("example.org", "ed", ED_KEY)]).sign(MESSAGE) + MESSAGE
    assert dkimpy_verdict(signed)
    assert ours(signed).result == "pass"
    assert ours(signed.replace(b"\r\n", b"\n")).result == "pass"
    assert ours(signed.replace(b"Hello", b"Jello")).result == "fail"


def test_a_changed_body_or_signed_field_fails_and_says_which() -> None:
    signed = dkimpy_sign(MESSAGE, include_headers=[b"from", b"to", b"subject"])
    assert ours(signed.replace(b"Hello", b"Jello")) == ds.Verdict(
        "fail", "body hash did not verify")
    assert ours(signed.replace(b"DKIM test", b"DKIM tost")) == ds.Verdict(
        "fail", "signature did not verify")
    # A field not signed may change, and one added above the signature too.
    assert ours(signed.replace(b"MIME-Version: 1.0", b"MIME-Version: 2.0")).result == "pass"
    assert ours(b"Received: by relay\r\n" + signed).result == "pass"


def test_the_signature_field_itself_is_signed_without_its_b_value() -> None:
    signed = dkimpy_sign(MESSAGE)
    at = signed.index(b" b=") + 12
    refolded = signed[:at] + b"\r\n\t " + signed[at:]      # inside b=: not signed
    assert ours(refolded).result == "pass"
    assert ours(signed.replace(b"c=relaxed/relaxed", b"c=relaxed/simple")).result == "fail"


# --- tags and key records -----------------------------------------------------------------

def resigned_field(message: bytes, **changes: bytes) -> bytes:
    """``message`` with its (first) DKIM-Signature's tags changed (not re-signed)."""
    head, rest = message.split(b"\r\n", 1)
    while rest[:1] in (b" ", b"\t"):
        line, rest = rest.split(b"\r\n", 1)
        head += b"\r\n" + line
    tags = ds.tag_list(head.split(b":", 1)[1])
    assert tags is not None
    for name, value in changes.items():
        tags[name.encode()] = value
    return (b"DKIM-Signature: " + b"; ".join(k + b"=" + v for k, v in tags.items())
            + b"\r\n" + rest)


@pytest.mark.parametrize("changes, reason", [
    ({"v": b"2"}, "v= is not 1"),
    ({"a": b"rsa-md5"}, "unknown signature algorithm a=rsa-md5"),
    ({"h": b"to:subject"}, "h= does not sign From:"),
    ({"i": b"@evil.example"}, "i= is not in d="),
    ({"c": b"loose/simple"}, "unknown canonicalization c=loose/simple"),
    ({"q": b"https"}, "q= does not offer dns/txt"),
    ({"l": b"ten"}, "l= is not a number"),
    ({"l": b"999999"}, "l= is longer than the body"),
    ({"t": b"1700000000", "x": b"1000"}, "x= is before t="),
    ({"t": b"1000", "x": b"2000"}, "signature expired (x=)"),
    ({"t": str(int(time.time()) + 86400 * 2).encode()}, "t= is in the future"),
    ({"bh": b"!!"}, "bh= is not base64"),
    ({"b": b"abc"}, "b= is not base64"),
])
def test_bad_tags_are_a_permerror_with_the_reason(changes: dict[str, bytes],
                                                   reason: str) -> None:
    signed = dkimpy_sign(MESSAGE)
    assert ours(resigned_field(signed, **changes)) == ds.Verdict("permerror", reason)


def test_missing_tags_are_named() -> None:
    signed = dkimpy_sign(MESSAGE)
    for name in ("v", "a", "b", "bh", "d", "h", "s"):
        broken = resigned_field(signed)
        tags = ds.tag_list(broken.split(b"\r\n", 1)[0].split(b":", 1)[1]) or {}
        del tags[name.encode()]
        broken = (b"DKIM-Signature: " + b"; ".join(k + b"=" + v for k, v in tags.items())
                  + b"\r\n" + broken.split(b"\r\n", 1)[1])
        assert ours(broken) == ds.Verdict("permerror", f"missing {name}=")


def test_identity_in_a_subdomain_passes_unless_the_key_says_strict() -> None:
    signed = dkimpy_sign(MESSAGE, identity=b"bob@mail.example.org")
    assert ours(signed).result == "pass"
    strict = RSA_RECORD.replace(b"v=DKIM1;", b"v=DKIM1; t=s;")
    assert ours(signed, strict) == ds.Verdict(
        "permerror", "i= is not d= exactly, as the key's t=s requires")


@pytest.mark.parametrize("record, verdict", [
    (RSA_RECORD.replace(b"p=", b"h=sha1; p="),
     ds.Verdict("permerror", "the key does not allow sha256 (h=)")),
    (RSA_RECORD.replace(b"p=", b"s=ftp; p="),
     ds.Verdict("permerror", "key is not for email (s=)")),
    (b"v=DKIM1; k=rsa; p=", ds.Verdict("permerror", "key revoked (empty p=)")),
    (b"v=DKIM1; k=rsa", ds.Verdict("permerror", "key record has no p=")),
    (b"v=DKIM2; p=AAAA", ds.Verdict("permerror", "key record is not v=DKIM1")),
    (b"garbage", ds.Verdict("permerror", "key record cannot be read")),
    (ED_RECORD, ds.Verdict("permerror", "a=rsa-sha256 does not match k=ed25519")),
])
def test_key_records_that_cannot_serve(record: bytes, verdict: ds.Verdict) -> None:
    assert ours(dkimpy_sign(MESSAGE), record) == verdict


def test_a_key_published_as_a_bare_pkcs1_rsa_key_is_read() -> None:
    public = RSA_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.PKCS1)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    assert ours(dkimpy_sign(MESSAGE), record).result == "pass"


def test_short_rsa_keys_and_rsa_sha1_are_refused_as_policy() -> None:
    signed = dkimpy_sign(MESSAGE)
    block, body = ds.split_message(signed)
    fields = ds.header_fields(block)
    tags = ds.tag_list(fields[0].raw.split(b":", 1)[1]) or {}
    assert ds.check(fields, body, 0, tags, ds.parse_key(RSA_RECORD), 2048) == ds.Verdict(
        "policy", "1024-bit RSA key is too short")
    sha1 = dkim.sign(MESSAGE, b"sel", b"example.org", RSA_PEM,
                     signature_algorithm=b"rsa-sha1") + MESSAGE
    assert dkimpy_verdict(sha1)
    assert ours(sha1) == ds.Verdict("policy",
                                    "rsa-sha1 signatures are not accepted (RFC 8301)")
    assert ours(sha1, accept_rsa_sha1=True).result == "pass"
    assert ours(sha1.replace(b"Hello", b"Jello"), accept_rsa_sha1=True).result == "fail"


def test_key_cache_parses_once_and_stays_bounded() -> None:
    cache = ds.KeyCache(size=2)
    first = cache.parsed(RSA_RECORD)
    assert cache.parsed(RSA_RECORD) is first
    cache.parsed(ED_RECORD)
    cache.parsed(b"v=DKIM1; p=")
    assert cache.parsed(RSA_RECORD) is not first     # pushed out by the two after it


@pytest.mark.parametrize("value", [b"a=1; a=2", b"no equals", b"1x=3", b"=3", b"a b=1"])
def test_tag_lists_that_cannot_be_read(value: bytes) -> None:
    assert ds.tag_list(value) is None


def test_tag_values_lose_their_blanks() -> None:
    assert ds.tag_list(b" v = 1 ;\r\n\tb= ab\r\n\t cd ; ") == {b"v": b"1", b"b": b"abcd"}
