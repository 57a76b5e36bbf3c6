"""Passwords, the signing key, signed session-id cookies, CSRF tokens and the login throttle.

* Passwords: scrypt (RFC 7914) with a random 16-byte salt, stored as
  ``scrypt$n$r$p$salt_hex$hash_hex``; compared in constant time.
* Signing key: never in the database. ``$INSTRUCTRL_LABEL_SECRET``, else a key file
  (0600) next to the SQLite file or at ``key_file``, made once on first start.
* Sessions: server-side rows in the store (:meth:`Store.create_session`); the cookie
  carries only the session id, signed and timestamped (itsdangerous), HttpOnly,
  SameSite=Lax. Logout or disabling the account revokes the row, so an old cookie
  stops working at once; a copied database alone cannot mint a cookie.
* CSRF: every state-changing request must carry ``csrf_token`` (form field) or
  an ``X-CSRF-Token`` header equal to HMAC(secret, sid) -- a per-session token
  an attacker's page cannot read (synchroniser-token pattern, OWASP).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from collections import deque
from pathlib import Path

from instructrl.config import ConfigError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SECRET_ENV = "INSTRUCTRL_LABEL_SECRET"
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


def default_key_file(db_url: str) -> Path:
    """Next to the SQLite file; for a server database, in the instructrl home folder."""
    from instructrl.runtime import instructrl_home

    if db_url.startswith("sqlite") and "///" in db_url and not db_url.endswith(":memory:"):
        path = db_url.split("///", 1)[1].split("?", 1)[0]
        if path:
            return Path(path).resolve().parent / (Path(path).name + ".key")
    return instructrl_home() / "labeling.key"


def load_secret(db_url: str, key_file: str = "") -> str:
    """The signing key: ``$INSTRUCTRL_LABEL_SECRET``, else the key file (made 0600 on first use)."""
    env = os.environ.get(SECRET_ENV, "")
    if env:
        if len(env) < 32:
            raise ConfigError(f"${SECRET_ENV} must be at least 32 characters")
        return env
    path = Path(key_file) if key_file else default_key_file(db_url)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent first start keeps the other's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a folder fails the read; a FIFO would block it forever
        raise ConfigError(f"key_file {path} is not a regular file")
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"key_file {path} is readable by other users: chmod 600 {path}")
    try:
        key = path.read_text(encoding="utf-8").strip()  # ours is hex; a key of your own must be text too
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"key_file {path} cannot be read as a text key: {getattr(e, 'strerror', None) or e}") from None
    if len(key) < 32:
        raise ConfigError(f"key_file {path} holds no usable key (fewer than 32 characters)")
    return key


def ascii_token(token: object) -> bytes | None:
    """A submitted token as bytes, or None when missing or not ASCII (a wrong token, not a crash)."""
    if not isinstance(token, str) or not token:
        return None
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        return None


class Sessions:
    """Sign and read session-id cookies; derive the session's CSRF token. Validity lives in the store."""

    COOKIE = "instructrl_session"

    def __init__(self, secret: str, max_age_s: int):
        from itsdangerous import URLSafeTimedSerializer

        self.secret = secret.encode()
        self.max_age_s = max_age_s
        self.ser = URLSafeTimedSerializer(secret, salt="instructrl-session")

    def cookie(self, sid: str) -> str:
        return self.ser.dumps(sid)

    def read(self, cookie: str | None) -> str | None:
        """The session id a cookie carries, or None when unsigned, wrongly signed, expired or malformed."""
        from itsdangerous import BadSignature

        if not cookie:
            return None
        try:
            sid = self.ser.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # includes SignatureExpired
            return None
        return sid if isinstance(sid, str) and 16 <= len(sid) <= 64 else None

    def csrf(self, sid: str) -> str:
        return hmac.new(self.secret, f"csrf:{sid}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, token: object) -> bool:
        got = ascii_token(token)
        return got is not None and hmac.compare_digest(self.csrf(sid).encode(), got)


class LoginThrottle:
    """After ``max_failures`` failed logins within ``window_s`` for one account or one address, refuse for a while.

    In memory: one server process holds all of it (``label serve`` runs one process).
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, clock=time.monotonic):
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self.fails: dict[str, deque] = {}
        self.lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque:
        """The failures of ``key`` inside the window; keys with none are dropped (memory stays bounded by
        the failures of the last window, however many names are tried)."""
        q = self.fails.get(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            self.fails.pop(key, None)
        return q

    def retry_after(self, name: str, addr: str) -> int:
        """Seconds until a login for (name, addr) may be tried again; 0 = allowed now."""
        now = self.clock()
        with self.lock:
            wait = 0.0
            for key in (f"user:{name}", f"addr:{addr}"):
                q = self._recent(key, now)
                if len(q) >= self.max_failures:
                    wait = max(wait, q[-self.max_failures] + self.window_s - now)
            return int(wait) + 1 if wait > 0 else 0

    def failed(self, name: str, addr: str) -> None:
        now = self.clock()
        with self.lock:
            for key in (f"user:{name}", f"addr:{addr}"):
                q = self._recent(key, now)
                q.append(now)
                self.fails[key] = q

    def succeeded(self, name: str) -> None:
        with self.lock:
            self.fails.pop(f"user:{name}", None)
