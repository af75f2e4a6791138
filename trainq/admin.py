"""``python -m trainq.admin``: issue, list and revoke API tokens (in the Redis at ``REDIS_URL``).

    python -m trainq.admin token create --owner alice [--admin]   # prints the token, once
    python -m trainq.admin token list                              # id, owner, admin, created
    python -m trainq.admin token revoke 3f2c9a1b                   # by id (≥ 8 hex digits)
    python -m trainq.admin token revoke --owner alice              # every token of alice

``create`` prints only the token on stdout, so ``TOKEN=$(python -m trainq.admin token create
--owner alice)`` works. Only the token's SHA-256 is stored: a lost token cannot be shown again;
revoke it and create another.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

import redis

from shared.auth import TokenStore
from shared.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainq.admin", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="API bearer tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="issue a token and print it")
    create.add_argument("--owner", required=True, help="who the token acts as (letters, digits, _ . @ -)")
    create.add_argument("--admin", action="store_true", help="sees and cancels every owner's jobs")
    token.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke = token.add_parser("revoke", help="revoke a token by id, or every token of an owner")
    revoke.add_argument("id", nargs="?", help="token id from `token list` (at least 8 hex digits)")
    revoke.add_argument("--owner", help="revoke every token of this owner")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one admin command; exit 0 on success, 1 when nothing matched or the input is wrong."""
    args = _parser().parse_args(argv)
    tokens = TokenStore(redis.Redis.from_url(get_settings().redis_url))
    try:
        if args.action == "create":
            print(tokens.create(args.owner, admin=args.admin))
            print(f"token for owner {args.owner!r}{' (admin)' if args.admin else ''}; it is not shown again", file=sys.stderr)
        elif args.action == "list":
            print(f"{'id':<12}  {'owner':<24}  {'admin':<5}  created (UTC)")
            for info in tokens.list():
                created = datetime.fromtimestamp(info.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                print(f"{info.id:<12}  {info.owner:<24}  {'yes' if info.admin else 'no':<5}  {created}")
        else:
            revoked = tokens.revoke(token_id=args.id, owner=args.owner)
            if not revoked:
                print("no token matched", file=sys.stderr)
                return 1
            for info in revoked:
                print(f"revoked {info.id} (owner {info.owner})")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except redis.ConnectionError as exc:
        print(f"error: cannot reach Redis at REDIS_URL ({exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
