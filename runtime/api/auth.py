"""Who may do what, for every endpoint FastAPI answers: one dependency the routers share.

runtime/gateway/hotpath.py has already authenticated the request (a missing or wrong key
with auth on never gets here) and left its Principal in the ASGI scope. Here it becomes an
`Access`: what the caller may see and change. With auth off (no admin key) everyone is an
admin, as on a laptop; a flowc key presented is still charged for what it runs and held to
its own limits (models, pipelines, read-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from runtime.access.gate import OPEN, Principal
from runtime.api.common import current
from runtime.gateway.calls import AccessError
from runtime.gateway.hotpath import PRINCIPAL


def forbidden(message: str, code: str = "permission_denied") -> AccessError:
    return AccessError(message, status=403, code=code)


@dataclass(frozen=True, slots=True)
class Access:
    who: Principal  # charged for what it runs
    admin: bool  # sees and changes everything: the admin key, or anyone with auth off

    @property
    def label(self) -> str:
        key = self.who.key
        return f"key '{key.name}'" if key is not None else "this caller"

    def data_scope(self) -> dict[str, str]:
        """The ledger filter a caller's reads are held to: none for an admin, its team for
        a key with one, else its own key."""
        key = self.who.key
        if self.admin or key is None:
            return {}
        return {"team": key.team} if key.team else {"key_id": key.id}

    def filters(self, team: str | None, key: str | None, tag: str | None) -> dict[str, Any]:
        """The report filters asked for (`?team=&key=&tag=`) within what the caller may see;
        asking for another team's or key's data is a 403."""
        scope = self.data_scope()
        if "team" in scope and team not in (None, scope["team"]):
            raise forbidden(f"{self.label} may read team '{scope['team']}'s data only, "
                            f"not team '{team}'s")
        if "key_id" in scope:
            if team is not None:
                raise forbidden(f"{self.label} has no team: it may read its own data only")
            if key not in (None, scope["key_id"]):
                raise forbidden(f"{self.label} may read its own data only")
        return {"team": team, "key_id": key, "tag": tag, **scope}

    def may_run(self, pipeline: str) -> None:
        key = self.who.key
        if key is None:
            return
        if key.read_only:
            raise forbidden(f"{self.label} is read-only: it cannot run pipelines")
        if not key.allows_pipeline(pipeline):
            raise forbidden(f"{self.label} may not run pipeline '{pipeline}' (allowed: "
                            f"{', '.join(key.pipelines)})", "pipeline_not_allowed")


def access(request: Request) -> Access:
    who: Principal = request.scope.get(PRINCIPAL, OPEN)
    return Access(who, who.admin or not current(request).gate.auth_on)


def admin(request: Request) -> Access:
    """For endpoints only the admin key may use (once auth is on)."""
    a = access(request)
    if not a.admin:
        raise forbidden(f"{request.method} {request.url.path} needs the admin key "
                        f"({a.label} may not use it)", "admin_only")
    return a


Caller = Annotated[Access, Depends(access)]
Admin = Annotated[Access, Depends(admin)]
