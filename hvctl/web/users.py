"""Users of the web page and the API: a JSON file of name -> role, argon2 password hash and
API token hashes. `hvctl web adduser NAME --role admin|viewer` writes it.

    {"users": {"ann": {"role": "admin", "hash": "$argon2id$...",
                       "tokens": {"k3f9...": "$argon2id$..."},
                       "totp": "BASE32SECRET"}}}     # optional: `hvctl web totp ann`

A token is `hvk_<id>_<secret>`: the id finds its hash, the secret is checked against it, so a
stolen file gives no usable token. The file is written atomically, mode 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hvctl.web import totp

ROLES = ("admin", "viewer")
NAME_LENGTH_MAX = 64
PASSWORD_LENGTH_MIN = 8
TOKEN_PREFIX = "hvk_"

_hasher = PasswordHasher()
# Verified when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class UserError(Exception):
    """Bad input for the users file; the message names the fix."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Users:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data: dict = {"users": {}}
        self._totp_last: dict[str, int] = {}  # user -> the last step a code was used for
        self._mtime = None
        self._load()

    def _load(self) -> None:
        """Read the file if it changed (a running server sees `hvctl web adduser|token|totp`
        without a restart); a file that no longer parses keeps what was read before."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            if self._mtime is not None:
                return  # half-written by hand: keep the last good one
            raise UserError(f"{self.path}: cannot read the users file ({e}); fix or "
                            "remove it, then add users with 'hvctl web adduser'") from None
        self._data, self._mtime = data, mtime

    @property
    def names(self) -> list[str]:
        return sorted(self._data["users"])

    def add(self, name: str, role: str, password: str) -> None:
        if not name or len(name) > NAME_LENGTH_MAX or not all(
                c.isalnum() or c in "-_." for c in name):
            raise UserError(f"user name '{name}' is not allowed; use up to {NAME_LENGTH_MAX} "
                            "letters, digits, '-', '_' and '.'")
        if role not in ROLES:
            raise UserError(f"role '{role}' is not one of {', '.join(ROLES)}")
        if len(password) < PASSWORD_LENGTH_MIN:
            raise UserError(f"the password is shorter than {PASSWORD_LENGTH_MIN} characters; "
                            "choose a longer one")
        self._load()
        entry = self._data["users"].setdefault(name, {"tokens": {}})
        entry["role"] = role
        entry["hash"] = _hasher.hash(password)
        self._save()

    def verify(self, name: str, password: str) -> User | None:
        self._load()
        entry = self._data["users"].get(name)
        try:
            _hasher.verify(entry["hash"] if entry else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return User(name, entry["role"]) if entry else None

    def _entry(self, name: str) -> dict:
        self._load()
        entry = self._data["users"].get(name)
        if entry is None:
            raise UserError(f"no user '{name}'; add it first with 'hvctl web adduser {name}'")
        return entry

    def set_totp(self, name: str) -> str:
        """Turn on NAME's second factor: a new secret (returned once, for the app)."""
        entry = self._entry(name)
        entry["totp"] = totp.new_secret()
        self._save()
        return entry["totp"]

    def clear_totp(self, name: str) -> bool:
        """Turn it off; False if it was not on."""
        had = self._entry(name).pop("totp", None) is not None
        self._save()
        return had

    def needs_code(self, name: str) -> bool:
        self._load()
        entry = self._data["users"].get(name)
        return bool(entry and entry.get("totp"))

    def check_code(self, name: str, code: str) -> bool:
        """NAME's one-time code, each at most once (a replayed code is refused)."""
        entry = self._data["users"].get(name)
        if not entry or not entry.get("totp"):
            return False
        step = totp.verify(entry["totp"], code, self._totp_last.get(name, -1))
        if step is None:
            return False
        self._totp_last[name] = step
        return True

    def new_token(self, name: str) -> str:
        entry = self._entry(name)
        tid, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        entry.setdefault("tokens", {})[tid] = _hasher.hash(secret)
        self._save()
        return f"{TOKEN_PREFIX}{tid}_{secret}"

    def check_token(self, token: str) -> User | None:
        self._load()
        if not token.startswith(TOKEN_PREFIX) or token.count("_") < 2:
            return None
        tid, secret = token[len(TOKEN_PREFIX):].split("_", 1)
        for name, entry in self._data["users"].items():
            h = entry.get("tokens", {}).get(tid)
            if h is None:
                continue
            try:
                _hasher.verify(h, secret)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
            return User(name, entry["role"])
        return None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._data, f, indent=2)
        os.replace(tmp, self.path)
        self._mtime = self.path.stat().st_mtime_ns
