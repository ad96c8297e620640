"""hvctl/web/totp.py against RFC 6238's test vectors (Appendix B) and RFC 4226's."""

from __future__ import annotations

import pytest

from hvctl.web import totp

RFC_KEY = b"12345678901234567890"


@pytest.mark.parametrize("t,code", [(59, "94287082"), (1111111109, "07081804"),
                                    (1111111111, "14050471"), (1234567890, "89005924"),
                                    (2000000000, "69279037"), (20000000000, "65353130")])
def test_rfc6238_sha1_vectors(t, code):
    assert totp.hotp(RFC_KEY, t // 30, digits=8) == code


def test_rfc4226_hotp_vectors():
    want = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
            "399871", "520489"]
    assert [totp.hotp(RFC_KEY, c) for c in range(10)] == want


def test_verify_window_replay_and_bad_input():
    secret = totp.new_secret()
    now = 1_700_000_015.0
    step = int(now // 30)
    code = totp.code_at(secret, now)
    assert totp.verify(secret, code, now=now) == step
    assert totp.verify(secret, code, last_step=step, now=now) is None  # used once only
    assert totp.verify(secret, totp.code_at(secret, now - 30), now=now) == step - 1
    assert totp.verify(secret, totp.code_at(secret, now - 90), now=now) is None  # too old
    assert totp.verify(secret, " " + code[:3] + " " + code[3:], now=now) == step
    for bad in ("", "12345", "abcdef", "1234567"):
        assert totp.verify(secret, bad, now=now) is None


def test_uri_for_authenticator_apps():
    u = totp.uri("JBSWY3DPEHPK3PXP", "ann")
    assert u.startswith("otpauth://totp/hvctl%3Aann?secret=JBSWY3DPEHPK3PXP&issuer=hvctl")
    assert "digits=6" in u and "period=30" in u
