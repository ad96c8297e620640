"""Checking a TLS certificate, key and CA file before use, with what is wrong in words.

`ssl.SSLContext.load_cert_chain` says `[SSL] PEM lib (_ssl.c:3900)` for a file that is not
PEM, for a key given where the certificate goes, and for much else, and it prompts on the
terminal for the password of an encrypted key. `check` looks at each file first, so that
`rblock serve --tls-cert/--tls-key/--tls-ca` and `rblock up` (a node's tls_cert, tls_key,
tls_ca) say which file is wrong and how to fix it:

    /etc/rblock/alpha-key.pem holds a certificate, not a private key; give the key the
    certificate was made with (PEM, "-----BEGIN PRIVATE KEY-----")

Only the standard library's ssl module is used (no cryptography package).
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

PEM_CERT = "-----BEGIN CERTIFICATE-----"
FILE_BYTES_MAX = 1 << 20  # a PEM certificate chain is a few KiB; anything bigger is not one


class TLSFileError(Exception):
    """One of the files is unusable; `which` is "cert", "key" or "ca"."""

    def __init__(self, which: str, message: str):
        super().__init__(message)
        self.which = which


def check(cert: str | Path, key: str | Path, ca: str | Path | None = None) -> None:
    """Raise TLSFileError naming the first unusable file and the fix; return if all load."""
    cert_text = _read("cert", cert)
    key_text = _read("key", key)
    _check_cert(cert, cert_text)
    _check_key(key, key_text)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TLSFileError("key", f"{key} is not the key of the certificate {cert}; give "
                                      "the key it was made with") from None
        raise TLSFileError("key", f"{cert} and {key} do not load as a certificate and its "
                                  f"key (OpenSSL says: {_reason(e)}); give a PEM certificate "
                                  "and its unencrypted PEM key") from None
    if ca is not None:
        ca_text = _read("ca", ca)
        if PEM_CERT not in ca_text:
            raise TLSFileError("ca", f"{ca} holds no usable CA certificate: {_what(ca_text)}; "
                                     "give the CA's certificate in PEM "
                                     f'("{PEM_CERT}")')
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, ValueError) as e:
            raise TLSFileError("ca", f"{ca} holds no usable CA certificate (OpenSSL says: "
                                     f"{_reason(e)}); give the CA's certificate in PEM") from None


def _read(which: str, path: str | Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(FILE_BYTES_MAX + 1)
    except IsADirectoryError:
        raise TLSFileError(which, f"{path} is a directory; give the PEM file") from None
    except OSError as e:
        raise TLSFileError(which, f"cannot read {path}: {e.strerror}; fix the path or the "
                                  "file's permissions") from None
    if len(data) > FILE_BYTES_MAX:
        raise TLSFileError(which, f"{path} is over {FILE_BYTES_MAX} bytes: not a PEM "
                                  "certificate or key; check the path")
    return data.decode("latin-1")


def _what(text: str) -> str:
    """What a file that is not the expected PEM holds, as far as one can tell."""
    if "PRIVATE KEY-----" in text:
        return "it holds a private key"
    if PEM_CERT in text:
        return "it holds a certificate"
    if "-----BEGIN CERTIFICATE REQUEST-----" in text:
        return "it holds a certificate request (CSR), not a signed certificate"
    if text.startswith("0\x82") or text.startswith("0\x81"):
        return "it looks like DER (binary); convert it with 'openssl x509 -inform der'"
    if not text.strip():
        return "it is empty"
    return "it is not PEM"


def _check_cert(path: str | Path, text: str) -> None:
    if PEM_CERT not in text:
        what = _what(text)
        if what == "it holds a private key":
            what = "it holds a private key, not a certificate (the two files swapped?)"
        raise TLSFileError("cert", f"{path} is not a certificate: {what}; give the "
                                   f'certificate in PEM ("{PEM_CERT}")')
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text[
            text.index(PEM_CERT):])
    except (ssl.SSLError, ValueError) as e:
        raise TLSFileError("cert", f"{path} holds a damaged certificate (OpenSSL says: "
                                   f"{_reason(e)}); give the certificate file again") from None
    not_after = _not_after(path)
    if not_after is not None and not_after < time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
        raise TLSFileError("cert", f"{path} expired on {when}; renew the certificate (and "
                                   "check this machine's clock)")


def _check_key(path: str | Path, text: str) -> None:
    if "PRIVATE KEY-----" not in text:
        what = _what(text)
        if what == "it holds a certificate":
            what = "it holds a certificate, not a private key (the two files swapped?)"
        raise TLSFileError("key", f"{path} is not a private key: {what}; give the key the "
                                  'certificate was made with (PEM, "-----BEGIN PRIVATE '
                                  'KEY-----")')
    if "ENCRYPTED" in text:
        raise TLSFileError("key", f"{path} is encrypted with a passphrase, and the server "
                                  "starts unattended; give it unencrypted ('openssl pkey -in "
                                  f"{path} -out NEW.pem', then chmod 600 NEW.pem)")


def _no_password() -> bytes:
    # Never reached for a key _check_key passed; without it OpenSSL would prompt on the
    # terminal of a daemon.
    raise TLSFileError("key", "the key asks for a passphrase; give it unencrypted")


def _not_after(path: str | Path) -> float | None:
    """The certificate's notAfter, from CPython's own decoder (None if it cannot say)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        return ssl.cert_time_to_seconds(decode(str(path))["notAfter"])
    except (ssl.SSLError, ValueError, KeyError, OSError):
        return None


def _reason(e: BaseException) -> str:
    """OpenSSL's reason in lower-case words ("PEM_LIB" -> "pem lib"), without file:line."""
    reason = getattr(e, "reason", None)
    if reason:
        return str(reason).replace("_", " ").lower()
    return str(e).split(" (_ssl.c")[0]
