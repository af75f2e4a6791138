"""Who is asking: bearer tokens, their owners, and which jobs an owner may see.

A token is 32 random bytes (``secrets.token_urlsafe``) with the prefix ``tq_``. Only its SHA-256
is stored, as the Redis hash ``trainq:token:<sha256 hex>`` with ``owner``, ``admin`` and
``created_at``; the set ``trainq:tokens`` lists the hashes. A plain hash (no salt, no slow KDF)
is enough because tokens are random, not passwords: nobody can guess one from its hash. Looking
a token up by its hash leaks nothing through timing, as an attacker cannot choose the hash; the
one comparison of secrets, against ``ADMIN_TOKEN``, uses :func:`hmac.compare_digest`.

Issue tokens with ``python -m trainq.admin token create --owner <name> [--admin]``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import redis
import redis.asyncio

from shared.records import ANONYMOUS_OWNER

TOKEN_KEY = "trainq:token:{}"
TOKENS_KEY = "trainq:tokens"
TOKEN_PREFIX = "tq_"
#: Every token :meth:`TokenStore.create` issues: the prefix and 32 random bytes in URL-safe base64
#: (43 characters). Anything else is refused without a look-up (issue 17: random tokens took the
#: API's Redis connections from everyone).
TOKEN_PATTERN = re.compile(r"^tq_[A-Za-z0-9_-]{43}$")
#: Owner names: also part of Redis keys, so no ``:`` or spaces.
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
#: The owner of requests made with ``ADMIN_TOKEN``.
ADMIN_OWNER = "admin"
#: Owners the service itself acts as: only an admin token may carry them (an ordinary token for
#: ``admin`` read and cancelled every job submitted with ``ADMIN_TOKEN``; issue 17).
RESERVED_OWNERS = frozenset({ANONYMOUS_OWNER, ADMIN_OWNER})
#: ``ADMIN_TOKEN`` shorter than this is ignored (the API warns at start).
MIN_ADMIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class Principal:
    """The owner a request acts as; an admin sees and cancels every owner's jobs."""

    owner: str
    admin: bool = False

    def can_see(self, owner: str) -> bool:
        """True when this principal may read and cancel jobs of ``owner``."""
        return self.admin or self.owner == owner


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without the token: ``id`` is the first 12 hex digits of its SHA-256."""

    id: str
    digest: str
    owner: str
    admin: bool
    created_at: float


def token_digest(token: str) -> str:
    """SHA-256 of ``token`` in hex: the only form in which a token is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_owner(owner: str) -> str:
    """Return ``owner`` if it is a valid owner name.

    Raises:
        ValueError: not 1–64 characters of letters, digits, ``_ . @ -`` (starting with a letter or digit).
    """
    if not OWNER_PATTERN.fullmatch(owner):  # fullmatch: `$` alone lets "name\n" through
        raise ValueError(f"owner {owner!r} must match {OWNER_PATTERN.pattern}")
    return owner


class TokenStore:
    """Creates, looks up, lists and revokes bearer tokens in Redis.

    Args:
        client: a ``redis.Redis`` on the job database (``REDIS_URL``).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, owner: str, *, admin: bool = False) -> str:
        """Issue a new token for ``owner`` and return it (shown once; only its hash is kept).

        Raises:
            ValueError: ``owner`` is not a valid owner name, or a reserved one (:data:`RESERVED_OWNERS`)
                for a token that is not ``admin``.
        """
        check_owner(owner)
        if owner in RESERVED_OWNERS and not admin:
            raise ValueError(f"owner {owner!r} is reserved for the service ({', '.join(sorted(RESERVED_OWNERS))}); "
                             "only an admin token (--admin) may act as it")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(TOKEN_KEY.format(digest), mapping={"owner": owner, "admin": int(admin), "created_at": time.time()})
        pipe.sadd(TOKENS_KEY, digest)
        pipe.execute()
        return token

    def lookup(self, token: str) -> Principal | None:
        """The principal ``token`` authenticates, or None for an unknown or revoked token."""
        key = _token_key(token)
        return _principal(self.redis.hgetall(key)) if key else None

    def list(self) -> list[TokenInfo]:
        """Every stored token (without the token itself), oldest first."""
        infos = []
        for member in self.redis.smembers(TOKENS_KEY):
            digest = member.decode()
            raw = self.redis.hgetall(TOKEN_KEY.format(digest))
            if raw:
                infos.append(
                    TokenInfo(digest[:12], digest, raw[b"owner"].decode(), raw.get(b"admin") == b"1", float(raw[b"created_at"]))
                )
        return sorted(infos, key=lambda info: info.created_at)

    def revoke(self, *, token_id: str | None = None, owner: str | None = None) -> list[TokenInfo]:
        """Revoke the token whose hash starts with ``token_id``, or every token of ``owner``.

        Returns the tokens revoked (empty when nothing matched).

        Raises:
            ValueError: neither or both given, ``token_id`` shorter than 8 hex digits, or it
                matches more than one token.
        """
        if (token_id is None) == (owner is None):
            raise ValueError("give a token id or an owner")
        if token_id is not None:
            if len(token_id) < 8:
                raise ValueError("a token id has at least 8 hex digits (see `token list`)")
            matches = [info for info in self.list() if info.digest.startswith(token_id.lower())]
            if len(matches) > 1:
                raise ValueError(f"token id {token_id!r} matches {len(matches)} tokens; give more digits")
        else:
            matches = [info for info in self.list() if info.owner == owner]
        for info in matches:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(TOKEN_KEY.format(info.digest))
            pipe.srem(TOKENS_KEY, info.digest)
            pipe.execute()
        return matches


def is_token_shaped(token: str) -> bool:
    """True when ``token`` has the shape of an issued token (:data:`TOKEN_PATTERN`); no look-up."""
    return TOKEN_PATTERN.fullmatch(token) is not None


def _token_key(token: str) -> str | None:
    """The Redis key of ``token``'s hash; None for a token no store holds (not :data:`TOKEN_PATTERN`)."""
    return TOKEN_KEY.format(token_digest(token)) if is_token_shaped(token) else None


def _principal(raw: dict[bytes, bytes]) -> Principal | None:
    """The principal of a token's stored hash (empty: unknown or revoked)."""
    if not raw:
        return None
    principal = Principal(owner=raw[b"owner"].decode(), admin=raw.get(b"admin") == b"1")
    if principal.owner in RESERVED_OWNERS and not principal.admin:
        return None  # issued before reserved owners were refused: it must not act as the service
    return principal


def _is_admin_token(token: str, admin_token: str | None) -> bool:
    return bool(admin_token) and len(admin_token) >= MIN_ADMIN_TOKEN_CHARS and hmac.compare_digest(
        token.encode("utf-8", "surrogatepass"), admin_token.encode("utf-8")
    )


async def authenticate_async(token: str, client: redis.asyncio.Redis, admin_token: str | None = None) -> Principal | None:
    """The principal of bearer ``token``: ``ADMIN_TOKEN`` (an admin) or a stored token (one
    ``HGETALL`` on the API's asyncio client); else None."""
    if _is_admin_token(token, admin_token):
        return Principal(owner=ADMIN_OWNER, admin=True)
    key = _token_key(token)
    return _principal(await client.hgetall(key)) if key else None
