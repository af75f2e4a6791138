"""``/tokens``: issue, list and revoke bearer tokens through the API, for admins only.

The same :class:`shared.auth.TokenStore` as ``python -m trainq.admin token`` (which needs Redis
access); here an admin (``ADMIN_TOKEN``, or a token issued with ``admin: true``) needs only the
API. Anyone else gets a 403.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool

from api.deps import PrincipalDep, StoreDep
from shared.auth import Principal, TokenInfo, TokenStore, token_digest
from shared.schemas import ErrorDetail, TokenCreate, TokenIssued, TokenList, TokenPublic

router = APIRouter(prefix="/tokens", tags=["tokens"], responses={403: {"model": ErrorDetail, "description": "Not an admin."}})


async def get_admin(principal: PrincipalDep) -> Principal:
    """The caller, if an admin; else 403."""
    if not principal.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin manages tokens (ADMIN_TOKEN or a token issued with --admin)")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


def _public(info: TokenInfo) -> TokenPublic:
    return TokenPublic(id=info.id, owner=info.owner, admin=info.admin, created_at=info.created_at)


def _unprocessable(loc: list[str], message: str, value: object) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": loc, "msg": message, "type": "value_error", "input": value}]
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenIssued)
async def create_token(body: TokenCreate, _: AdminDep, store: StoreDep) -> TokenIssued:
    """Issue a token for `owner`; the answer holds the token, shown this once."""
    tokens = TokenStore(store.redis)
    try:
        token = await run_in_threadpool(tokens.create, body.owner, admin=body.admin)
    except ValueError as exc:
        raise _unprocessable(["body", "owner"], str(exc), body.owner) from exc
    digest = token_digest(token)
    info = next(info for info in await run_in_threadpool(tokens.list) if info.digest == digest)
    return TokenIssued(**_public(info).model_dump(), token=token)


@router.get("", response_model=TokenList)
async def read_tokens(_: AdminDep, store: StoreDep) -> TokenList:
    """Every token (never the tokens themselves), oldest first."""
    infos = await run_in_threadpool(TokenStore(store.redis).list)
    return TokenList(data=[_public(info) for info in infos])


@router.delete("", response_model=TokenList, responses={404: {"model": ErrorDetail}})
async def revoke_tokens(
    _: AdminDep,
    store: StoreDep,
    token_id: Annotated[str | None, Query(alias="id", min_length=8, max_length=64, description="A token id (at least 8 hex digits).")] = None,
    owner: Annotated[str | None, Query(max_length=64, description="Revoke every token of this owner.")] = None,
) -> TokenList:
    """Revoke the token `id`, or every token of `owner`; the answer lists what was revoked (404: none)."""
    try:
        revoked = await run_in_threadpool(TokenStore(store.redis).revoke, token_id=token_id, owner=owner)
    except ValueError as exc:
        raise _unprocessable(["query", "id" if token_id is not None else "owner"], str(exc), token_id or owner) from exc
    if not revoked:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no token matched")
    return TokenList(data=[_public(info) for info in revoked])
