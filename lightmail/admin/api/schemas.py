"""JSON Schemas (draft 2020-12, as OpenAPI 3.1 has them) of what the admin API takes
and answers: the request bodies are checked against them, and the OpenAPI document
is made of them."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (),
        description: str = "") -> Schema:
    out: Schema = {"type": "object", "properties": properties,
                   "required": list(required), "additionalProperties": False}
    if description:
        out["description"] = description
    return out


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


TEXT: Schema = {"type": "string", "minLength": 1, "maxLength": 255}
ADDRESS: Schema = {"type": "string", "minLength": 3, "maxLength": 320,
                   "pattern": r"^[^@\s]+@[^@\s]+$", "description": "localpart@domain"}
DOMAIN: Schema = {"type": "string", "minLength": 1, "maxLength": 253,
                  "description": "a domain name (IDNs in U-labels or A-labels)"}
PASSWORD: Schema = {"type": "string", "minLength": 1, "maxLength": 1024,
                    "writeOnly": True}
BYTES: Schema = {"type": "integer", "minimum": 0, "maximum": 2 ** 62,
                 "description": "octets; 0: no quota"}
MILLIS: Schema = {"type": "integer", "description": "milliseconds since the Unix epoch"}

ERROR = obj({"error": obj({
    "status": {"type": "integer"},
    "message": {"type": "string"},
    "field": {"type": "string", "description": "the body member or parameter at fault"},
}, ("status", "message"))}, ("error",))

DOMAIN_OUT = obj({"name": DOMAIN}, ("name",))
DOMAIN_IN = obj({"name": DOMAIN}, ("name",))

USER_OUT = obj({
    "address": ADDRESS,
    "quota": BYTES,
    "enabled": {"type": "boolean"},
    "last_login": nullable(MILLIS),
    "last_login_from": nullable({"type": "string", "description": "protocol and address"}),
}, ("address", "quota", "enabled", "last_login", "last_login_from"))
USER_IN = obj({
    "address": ADDRESS,
    "password": {**PASSWORD, "description": "none: the user cannot log in with a "
                 "password until one is set (app passwords still work)"},
    "quota": {**BYTES, "description": "octets; absent: [directory] default_quota; 0: none"},
}, ("address",))
USER_CHANGE = obj({
    "password": {**PASSWORD, "description": "a new password (ends an expiry)"},
    "quota": BYTES,
    "enabled": {"type": "boolean", "description": "false: logins refused, mail still "
                "delivered"},
    "password_expired": {"const": True, "description": "the password works no more "
                         "until a new one is set"},
}, description="Only the members given change.")

ALIAS = obj({"source": ADDRESS, "destination": ADDRESS}, ("source", "destination"))

PROTOCOL = {"enum": ["imap", "pop3", "smtp"]}
APP_PASSWORD_OUT = obj({
    "name": TEXT,
    "protocols": {**array(PROTOCOL), "description": "empty: every protocol"},
    "created": MILLIS,
    "last_used": nullable(MILLIS),
}, ("name", "protocols", "created", "last_used"))
APP_PASSWORD_IN = obj({
    "name": TEXT,
    "protocols": {**array(PROTOCOL), "uniqueItems": True,
                  "description": "absent or empty: every protocol"},
}, ("name",))
APP_PASSWORD_MADE = obj({
    "name": TEXT,
    "protocols": array(PROTOCOL),
    "secret": {"type": "string", "description": "shown only this once"},
}, ("name", "protocols", "secret"))

DKIM_KEY = obj({
    "domain": DOMAIN,
    "selector": TEXT,
    "algorithm": {"enum": ["rsa-sha256", "ed25519-sha256"]},
    "bits": {"type": "integer", "description": "RSA modulus size; 0 for Ed25519"},
    "record_name": {"type": "string"},
    "record": {"type": "string", "description": "the TXT record value to publish"},
    "path": {"type": "string", "description": "the private key file"},
}, ("domain", "selector", "algorithm", "bits", "record_name", "record", "path"))

QUEUE_STATE = {"enum": ["queued", "active", "deferred", "held", "dead"]}
QUEUE_RECIPIENT = obj({
    "address": ADDRESS,
    "state": QUEUE_STATE,
    "transport": {"type": "string"},
    "attempts": {"type": "integer"},
    "next_attempt": MILLIS,
    "last_error": nullable({"type": "string"}),
}, ("address", "state", "transport", "attempts", "next_attempt", "last_error"))
QUEUE_MESSAGE = obj({
    "queue_id": TEXT,
    "from": {"type": "string", "description": "the envelope sender; empty: <>"},
    "size": {"type": "integer"},
    "received": MILLIS,
    "source": {"type": "string",
               "description": "mx, submission (also the send endpoint), lmtp, local"},
    "auth_user": nullable({"type": "string"}),
    "client_address": nullable({"type": "string"}),
    "recipients": array(QUEUE_RECIPIENT),
}, ("queue_id", "from", "size", "received", "source", "auth_user", "client_address",
    "recipients"))
QUEUE_PAGE = obj({
    "items": array(QUEUE_MESSAGE),
    "next": nullable({"type": "string", "description": "pass as cursor for the next "
                      "page; null: this is the last"}),
}, ("items", "next"))
QUEUE_DETAIL = obj({
    **QUEUE_MESSAGE["properties"],
    "envid": nullable({"type": "string"}),
    "ret": nullable({"type": "string"}),
    "body": nullable({"type": "string"}),
    "smtputf8": {"type": "boolean"},
    "headers": {**array(obj({"name": {"type": "string"}, "value": {"type": "string"}},
                            ("name", "value"))),
                "description": "the header fields in order (names in lower case, "
                "values unfolded)"},
}, tuple(QUEUE_MESSAGE["required"]) + ("envid", "ret", "body", "smtputf8", "headers"))
QUEUE_CHANGED = obj({"recipients": {"type": "integer", "description": "how many "
                                    "recipients changed state"}}, ("recipients",))

NODE = obj({
    "node_id": {"type": "string", "description": "its [server] node_id"},
    "host": {"type": "string"},
    "pid": {"type": "integer"},
    "state": {"type": "string", "enum": ["running", "draining", "stopped", "dead"]},
    "version": {"type": "string", "description": "its LightMail version"},
    "started": MILLIS,
    "heartbeat": MILLIS,
    "heartbeat_age": {"type": "number", "description": "seconds since its heartbeat"},
    "drain_requested": nullable({**MILLIS, "description": "when a drain was asked of "
                                 "it; null: never"}),
    "leases": {"type": "integer", "description": "queue recipients it is delivering "
               "(leased)"},
}, ("node_id", "host", "pid", "state", "version", "started", "heartbeat",
    "heartbeat_age", "drain_requested", "leases"))

SEND_IN = obj({
    "user": {**ADDRESS, "description": "the user it is sent as (as if authenticated "
             "on submission)"},
    "from": {**ADDRESS, "description": "the envelope sender; absent: the user"},
    "to": {**array(ADDRESS), "minItems": 1, "maxItems": 1000},
    "message": {"type": "string", "minLength": 1, "description": "the message (RFC "
                "5322, header and body), as text; line ends are made CRLF"},
}, ("user", "to", "message"))
SEND_OUT = obj({
    "queue_id": TEXT,
    "recipients": array({"type": "string"}),
}, ("queue_id", "recipients"))
