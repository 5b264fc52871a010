"""API keys: identities with scopes, their hashed secrets, rotation and revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from remotegpu_gateway.store.database import Database, _key, _text
from remotegpu_gateway.store.records import KeyRecord, NotFoundError
from remotegpu_gateway.store.schema import KEY_PREFIX, SCOPES, api_key_secrets, api_keys


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """`rgpu_<lookup id>.<secret>` -> (lookup id, secret)."""
    if not token.startswith(KEY_PREFIX):
        return None
    sid, dot, secret = token[len(KEY_PREFIX) :].partition(".")
    if not dot or not sid or not secret or len(sid) > 40 or not all(c in "0123456789abcdef" for c in sid):
        return None
    return sid, secret


_DUMMY_HASH = hash_secret("not a key")

# Hot-path statements, built once (SQLAlchemy then reuses their compiled form).
_AUTH_QUERY = (
    sa.select(
        api_key_secrets.c.secret_hash,
        api_key_secrets.c.expires_at,
        api_key_secrets.c.revoked_at.label("secret_revoked_at"),
        api_keys,
    )
    .join(api_keys, api_keys.c.id == api_key_secrets.c.key_id)
    .where(api_key_secrets.c.id == sa.bindparam("sid"))
)


class KeyStore(Database):
    """API keys and their secrets."""

    def create_key(
        self, name: str, scopes: list[str], expires_in_seconds: float | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key identity and its first secret (optionally expiring); returns (key, token)."""
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {scopes}")
        now = self.clock()
        key_id = "key_" + secrets.token_hex(8)
        with self._tx() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id, name=_text(name), scopes=",".join(sorted(set(scopes))), created_at=now
                )
            )
            expires = now + expires_in_seconds if expires_in_seconds is not None else None
            token = self._new_secret(conn, key_id, now, expires)
        return self.get_key(key_id), token

    @staticmethod
    def _new_secret(conn: Connection, key_id: str, now: float, expires_at: float | None = None) -> str:
        sid = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        conn.execute(
            api_key_secrets.insert().values(
                id=sid, key_id=key_id, secret_hash=hash_secret(secret), created_at=now, expires_at=expires_at
            )
        )
        return f"{KEY_PREFIX}{sid}.{secret}"

    def get_key(self, key_id: str) -> KeyRecord:
        if not _key(key_id):
            raise NotFoundError(key_id)
        with self._ro() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFoundError(key_id)
            secs = conn.execute(
                sa.select(api_key_secrets)
                .where(api_key_secrets.c.key_id == key_id)
                .order_by(api_key_secrets.c.created_at)
            ).all()
        return self._key_record(row, secs)

    @staticmethod
    def _key_record(row: Any, secs: Any) -> KeyRecord:
        m = row._mapping
        return KeyRecord(
            id=m["id"],
            name=m["name"],
            scopes=m["scopes"].split(","),
            created_at=m["created_at"],
            last_used_at=m["last_used_at"],
            revoked_at=m["revoked_at"],
            secrets=[
                {
                    "id": s.id,
                    "created_at": s.created_at,
                    "expires_at": s.expires_at,
                    "revoked_at": s.revoked_at,
                }
                for s in secs
            ],
        )

    def list_keys(self) -> list[KeyRecord]:
        with self._ro() as conn:
            rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at)).all()
            secs = conn.execute(sa.select(api_key_secrets).order_by(api_key_secrets.c.created_at)).all()
        by_key: dict[str, list[Any]] = {}
        for s in secs:
            by_key.setdefault(s.key_id, []).append(s)
        return [self._key_record(r, by_key.get(r.id, [])) for r in rows]

    def rotate_key(self, key_id: str, grace_seconds: float = 0) -> str:
        """A new secret for the same key identity (same scopes, same expiry); the old ones stop
        working after the grace period."""
        if not _key(key_id):
            raise NotFoundError(key_id)
        now = self.clock()
        with self._tx() as conn:
            row = conn.execute(sa.select(api_keys.c.revoked_at).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFoundError(key_id)
            if row.revoked_at is not None:
                raise ValueError(f"key {key_id} is revoked")
            expires_at = self._key_expiry(conn, key_id)
            if expires_at is not None and expires_at <= now:
                raise ValueError(f"key {key_id} has expired; create a new key")
            live = sa.and_(api_key_secrets.c.key_id == key_id, api_key_secrets.c.revoked_at.is_(None))
            if grace_seconds > 0:
                conn.execute(
                    api_key_secrets.update()
                    .where(
                        live,
                        sa.or_(
                            api_key_secrets.c.expires_at.is_(None),
                            api_key_secrets.c.expires_at > now + grace_seconds,
                        ),
                    )
                    .values(expires_at=now + grace_seconds)
                )
            else:
                conn.execute(api_key_secrets.update().where(live).values(revoked_at=now))
            return self._new_secret(conn, key_id, now, expires_at)

    @staticmethod
    def _key_expiry(conn: Connection, key_id: str) -> float | None:
        """The key's expiry: its newest secret's (a rotation copies it to the new secret, while
        the grace period only ever shortens the older secrets')."""
        return conn.execute(  # type: ignore[no-any-return]
            sa.select(api_key_secrets.c.expires_at)
            .where(api_key_secrets.c.key_id == key_id)
            .order_by(api_key_secrets.c.created_at.desc())
            .limit(1)
        ).scalar()

    def revoke_key(self, key_id: str) -> KeyRecord:
        if not _key(key_id):
            raise NotFoundError(key_id)
        now = self.clock()
        with self._tx() as conn:
            n = conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount
            if (
                n == 0
                and conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id)).first() is None
            ):
                raise NotFoundError(key_id)
            conn.execute(
                api_key_secrets.update()
                .where(api_key_secrets.c.key_id == key_id, api_key_secrets.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return self.get_key(key_id)

    def authenticate(self, token: str, touch_interval: float = 60.0) -> KeyRecord | None:
        """The key identity a bearer token belongs to, or None (unknown, revoked, expired)."""
        parts = split_token(token)
        sid, secret = parts if parts else ("", token)
        with self._ro() as conn:
            row = conn.execute(_AUTH_QUERY, {"sid": sid}).first()
        # Always one constant-time comparison, whether or not the lookup id exists.
        matches = hmac.compare_digest(
            hash_secret(secret), row.secret_hash if row is not None else _DUMMY_HASH
        )
        if row is None or not matches:
            return None
        now = self.clock()
        if row.secret_revoked_at is not None or row.revoked_at is not None:
            return None
        if row.expires_at is not None and row.expires_at <= now:
            return None
        key = KeyRecord(
            id=row.id,
            name=row.name,
            scopes=row.scopes.split(","),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=None,
        )
        if row.last_used_at is None or now - row.last_used_at >= touch_interval:
            with self._tx() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(last_used_at=now))
            key.last_used_at = now
        return key
