"""Users of the web page and the API: a JSON file of name -> role, argon2 password hash and
API token hashes. `hvctl web adduser NAME --role admin|viewer` writes it.

    {"users": {"ann": {"role": "admin", "hash": "$argon2id$...",
                       "tokens": {"k3f9...": "$argon2id$..."}}}}

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
        if self.path.exists():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{self.path}: cannot read the users file ({e}); fix or "
                                "remove it, then add users with 'hvctl web adduser'") from None

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
        entry = self._data["users"].setdefault(name, {"tokens": {}})
        entry["role"] = role
        entry["hash"] = _hasher.hash(password)
        self._save()

    def verify(self, name: str, password: str) -> User | None:
        entry = self._data["users"].get(name)
        try:
            _hasher.verify(entry["hash"] if entry else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return User(name, entry["role"]) if entry else None

    def new_token(self, name: str) -> str:
        entry = self._data["users"].get(name)
        if entry is None:
            raise UserError(f"no user '{name}'; add it first with 'hvctl web adduser {name}'")
        tid, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        entry.setdefault("tokens", {})[tid] = _hasher.hash(secret)
        self._save()
        return f"{TOKEN_PREFIX}{tid}_{secret}"

    def check_token(self, token: str) -> User | None:
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
