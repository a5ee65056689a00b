"""SMTP replies with RFC 3463 enhanced status codes (RFC 2034: on every reply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    status: str           # enhanced status code, e.g. "5.1.1"
    text: str

    def render(self, enhanced: bool = True) -> bytes:
        lines = self.text.split("\n")
        out = []
        for index, line in enumerate(lines):
            sep = "-" if index < len(lines) - 1 else " "
            prefix = f"{self.status} " if enhanced and self.status else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def is_error(self) -> bool:
        return self.code >= 400


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET = Reply(250, "2.0.0", "Reset")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321 and https://lightmail docs")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing channel")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing channel")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing channel")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands before authentication")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
BAD_PARAM = Reply(555, "5.5.4", "Unsupported or malformed parameter")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
PASSWORD_EXPIRED = Reply(535, "5.7.8", "The password has expired: ask for a new one")
# RFC 4954 §6: the directory could not be asked; try again later.
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
TLS_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication "
                                   "mechanism")
# RFC 8689 §2: REQUIRETLS only over TLS (RFC 3207's 530: STARTTLS first).
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session: "
                                            "issue STARTTLS first")
NO_SUCH_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
UTF8_NEEDS_PARAM = Reply(553, "5.6.7", "UTF-8 address needs the SMTPUTF8 parameter")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
LONG_LINES = Reply(552, "5.3.4", "Message has lines longer than the limit")
BARE_NEWLINE = Reply(550, "5.5.2", "Bare <LF> or <CR> in message: use <CR><LF> line endings")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "Message contains NUL characters")
NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients")
