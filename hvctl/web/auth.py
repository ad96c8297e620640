"""Sessions, CSRF, login rate limits, roles: the web page's and the API's access rules.

- Everything but the login page and the static files needs a session cookie (HttpOnly,
  SameSite=Strict, Secure under TLS) or an API token (`Authorization: Bearer hvk_...`).
  Without one: the API answers 401 JSON, a page redirects to /login.
- A request that changes state (POST, PUT, PATCH, DELETE) with a session cookie must carry
  the session's CSRF token (header X-CSRF-Token, or the form field csrf_token): else 403.
  A token request needs none (no browser sends it by itself).
- A viewer may read everything and change nothing: 403, from the API itself.
- Login attempts: at most LOGIN_ATTEMPTS_MAX failures per client address and per user name
  in LOGIN_WINDOW_S; more are refused (429) before the password is checked.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from hvctl.web.users import User

SESSION_TTL_S = 8 * 3600.0
SESSIONS_MAX = 10_000
LOGIN_ATTEMPTS_MAX = 5
LOGIN_WINDOW_S = 60.0
COOKIE = "hvctl_session"
CSRF_HEADER = "X-CSRF-Token"
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Session:
    id: str
    user: User
    csrf: str
    expires: float


@dataclass
class Sessions:
    by_id: dict[str, Session] = field(default_factory=dict)

    def create(self, user: User, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        if len(self.by_id) >= SESSIONS_MAX:
            self.expire(now)
            if len(self.by_id) >= SESSIONS_MAX:  # still full: drop the oldest
                oldest = min(self.by_id.values(), key=lambda s: s.expires)
                del self.by_id[oldest.id]
        s = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32),
                    now + SESSION_TTL_S)
        self.by_id[s.id] = s
        return s

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        if not sid:
            return None
        s = self.by_id.get(sid)
        if s is None or s.expires < (time.time() if now is None else now):
            self.by_id.pop(sid or "", None)
            return None
        return s

    def drop(self, sid: str) -> None:
        self.by_id.pop(sid, None)

    def expire(self, now: float) -> None:
        for sid in [k for k, s in self.by_id.items() if s.expires < now]:
            del self.by_id[sid]


@dataclass
class LoginLimit:
    failures: dict[str, deque] = field(default_factory=dict)

    def allowed(self, keys: list[str], now: float | None = None) -> bool:
        now = time.time() if now is None else now
        for k in keys:
            q = self.failures.get(k)
            while q and q[0] < now - LOGIN_WINDOW_S:
                q.popleft()
            if q is not None and len(q) >= LOGIN_ATTEMPTS_MAX:
                return False
        return True

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for k in keys:
            self.failures.setdefault(k, deque(maxlen=LOGIN_ATTEMPTS_MAX * 2)).append(now)

    def succeeded(self, keys: list[str]) -> None:
        for k in keys:
            self.failures.pop(k, None)


def csrf_ok(session: Session, header: str | None, form: str | None) -> bool:
    given = header or form or ""
    return bool(given) and secrets.compare_digest(given, session.csrf)
