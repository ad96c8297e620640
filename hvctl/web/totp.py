"""Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP, HMAC-SHA1, 6 digits,
30 s steps): the optional second factor of a web user, as every authenticator app reads
them from an otpauth:// URI. Pure.

The standard library does all of it in a few lines (hmac, base64); the RFC's own test
vectors hold it to the standard (tests/test_web_totp.py).

A code is accepted for its step and the one before and after (a phone's clock a little off),
and a step is used at most once per user (`verify` returns it; the caller keeps the last one
and passes it back), so a code seen over a shoulder cannot be replayed.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import struct
import time
from urllib.parse import quote, urlencode

STEP_S = 30
DIGITS = 6
WINDOW = 1  # steps either side of now
SECRET_BYTES = 20  # RFC 4226's recommended 160 bits


def new_secret() -> str:
    """A random secret, base32 without padding (what authenticator apps take)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")


def _key(secret: str) -> bytes:
    s = secret.upper().replace(" ", "")
    return base64.b32decode(s + "=" * (-len(s) % 8))


def hotp(key: bytes, counter: int, digits: int = DIGITS,
         digest: str = "sha1") -> str:
    mac = hmac.new(key, struct.pack(">Q", counter), digest).digest()
    off = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 10 ** digits
    return str(code).zfill(digits)


def code_at(secret: str, t: float) -> str:
    return hotp(_key(secret), int(t // STEP_S))


def verify(secret: str, code: str, last_step: int = -1, now: float | None = None) -> int | None:
    """The step CODE belongs to, if it is valid now and newer than LAST_STEP; else None."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    key = _key(secret)
    step = int((time.time() if now is None else now) // STEP_S)
    for s in range(step - WINDOW, step + WINDOW + 1):
        if s > last_step and hmac.compare_digest(hotp(key, s), code):
            return s
    return None


def uri(secret: str, user: str, issuer: str = "hvctl") -> str:
    """otpauth://totp/... for a QR code or to paste into an authenticator app."""
    label = quote(f"{issuer}:{user}")
    return f"otpauth://totp/{label}?" + urlencode(
        {"secret": secret, "issuer": issuer, "algorithm": "SHA1", "digits": DIGITS,
         "period": STEP_S})


