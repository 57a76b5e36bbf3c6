"""Passwords, signed session cookies and CSRF tokens -- standard library + itsdangerous.

* Passwords: scrypt (RFC 7914) with a random 16-byte salt, stored as
  ``scrypt$n$r$p$salt_hex$hash_hex``; compared in constant time.
* Sessions: the cookie holds ``{"uid", "sid"}`` signed and timestamped with the
  server's secret (itsdangerous); it is HttpOnly and SameSite=Lax, and expires.
* CSRF: every state-changing request must carry ``csrf_token`` (form field) or
  an ``X-CSRF-Token`` header equal to HMAC(secret, sid) -- a per-session token
  an attacker's page cannot read (synchroniser-token pattern, OWASP).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_DUMMY = None


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    h = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${h.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches ``stored``; ``stored=None`` does the same work and returns False."""
    global _DUMMY
    if stored is None:
        if _DUMMY is None:
            _DUMMY = hash_password(secrets.token_hex(8))
        stored, ok = _DUMMY, False
    else:
        ok = True
    try:
        algo, n, r, p, salt, want = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), want) and ok


class Sessions:
    """Sign and read session cookies; derive the session's CSRF token."""

    COOKIE = "instructrl_session"

    def __init__(self, secret: str, max_age_s: int):
        from itsdangerous import URLSafeTimedSerializer

        self.secret = secret.encode()
        self.max_age_s = max_age_s
        self.ser = URLSafeTimedSerializer(secret, salt="instructrl-session")

    def new(self, uid: int) -> tuple[str, str]:
        """(cookie value, session id) for a fresh login."""
        sid = secrets.token_hex(16)
        return self.ser.dumps({"uid": uid, "sid": sid}), sid

    def read(self, cookie: str | None) -> dict | None:
        from itsdangerous import BadSignature

        if not cookie:
            return None
        try:
            data = self.ser.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # includes SignatureExpired
            return None
        return data if isinstance(data, dict) and "uid" in data and "sid" in data else None

    def csrf(self, sid: str) -> str:
        return hmac.new(self.secret, f"csrf:{sid}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(sid), token)
