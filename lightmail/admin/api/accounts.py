"""The admin API's domains, users, aliases and app passwords: what ``lightmail
domain|user|alias`` does, over HTTP, through the same directory calls."""

from __future__ import annotations

from typing import Any

from lightmail.address import normalise_address, normalise_domain
from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import ApiError, Call, Param, Route
from lightmail.directory.apppasswords import AppPassword
from lightmail.directory.interfaces import NotFound, User

V1 = "/api/v1"
ADDRESS = Param("address", "path", js.ADDRESS, "the user's address")
DOMAIN_FILTER = Param("domain", "query", js.DOMAIN, "only this domain's")


class Accounts:
    def __init__(self, services: Any) -> None:
        self.directory = services.directory
        self.accounts = services.accounts       # the SQL side of every user

    # -- domains ------------------------------------------------------------------------

    async def list_domains(self, call: Call) -> Any:
        return [{"name": name} for name in await self.directory.list_domains()]

    async def add_domain(self, call: Call) -> Any:
        await self.directory.add_domain(call.body["name"])
        return {"name": normalise_domain(call.body["name"])}

    async def remove_domain(self, call: Call) -> None:
        await self.directory.remove_domain(call.params["domain"])

    # -- users --------------------------------------------------------------------------

    async def list_users(self, call: Call) -> Any:
        users = await self.directory.list_users(call.params.get("domain"))
        logins = {login.address: login for login in
                  await self.accounts.last_logins(call.params.get("domain"))}
        return [_user(user, logins.get(user.address)) for user in users]

    async def show_user(self, call: Call) -> Any:
        return await self._user(call.params["address"])

    async def _user(self, address: str) -> Any:
        user = await self.directory.get_user(address)
        if user is None:
            raise NotFound(f"no such user: {address}")
        domain = user.address.rpartition("@")[2]
        logins = await self.accounts.last_logins(domain)
        return _user(user, next((x for x in logins if x.address == user.address), None))

    async def add_user(self, call: Call) -> Any:
        body = call.body
        user = await self.directory.add_user(body["address"], body.get("password"),
                                             body.get("quota"))
        return _user(user, None)

    async def change_user(self, call: Call) -> Any:
        address, body = call.params["address"], call.body
        if not body:
            raise ApiError(400, "nothing to change: give password, quota, enabled or "
                           "password_expired")
        if body.get("password_expired") and "password" in body:
            raise ApiError(400, "password_expired: a new password ends the expiry; give "
                           "one or the other", "password_expired")
        await self._user(address)          # 404 before any change
        if "password" in body:
            await self.directory.set_password(address, body["password"])
        if "quota" in body:
            await self.accounts.set_quota(address, body["quota"])
        if "enabled" in body:
            await self.accounts.set_enabled(address, body["enabled"])
        if body.get("password_expired"):
            await self.accounts.expire_password(address)
        return await self._user(address)

    async def remove_user(self, call: Call) -> None:
        await self.directory.remove_user(call.params["address"])

    # -- aliases ------------------------------------------------------------------------

    async def list_aliases(self, call: Call) -> Any:
        return [{"source": alias.source, "destination": alias.destination}
                for alias in await self.directory.list_aliases(call.params.get("domain"))]

    async def add_alias(self, call: Call) -> Any:
        source, destination = call.body["source"], call.body["destination"]
        await self.directory.add_alias(source, destination)
        # As the directory wrote them (lower case, A-labels).
        local, _, domain = source.strip().rpartition("@")
        return {"source": f"{local.lower()}@{normalise_domain(domain)}",
                "destination": normalise_address(destination)}

    async def remove_alias(self, call: Call) -> Any:
        count = await self.directory.remove_alias(call.params["source"],
                                                  call.params.get("destination"))
        if not count:
            raise NotFound(f"no such alias: {call.params['source']}")
        return {"removed": count}

    # -- app passwords --------------------------------------------------------------------

    async def list_app_passwords(self, call: Call) -> Any:
        return [_app_password(found) for found in
                await self.accounts.list_app_passwords(call.params["address"])]

    async def add_app_password(self, call: Call) -> Any:
        protocols = tuple(sorted(set(call.body.get("protocols", ()))))
        secret = await self.accounts.add_app_password(call.params["address"],
                                                      call.body["name"], protocols)
        return {"name": call.body["name"], "protocols": list(protocols), "secret": secret}

    async def revoke_app_password(self, call: Call) -> None:
        await self.accounts.revoke_app_password(call.params["address"], call.params["name"])

    def routes(self) -> list[Route]:
        domain = Param("domain", "path", js.DOMAIN, "the domain")
        source = Param("source", "path", js.ADDRESS, "the alias (*@domain: catch-all)")
        removed = js.obj({"removed": {"type": "integer"}}, ("removed",))
        user = {"address": "$response.body#/address"}
        of_user = tuple((op, user) for op in ("showUser", "changeUser", "removeUser",
                                              "listAppPasswords", "addAppPassword"))
        return [
            Route("GET", f"{V1}/domains", self.list_domains, "The local domains", "domains",
                  response=js.array(js.DOMAIN_OUT), operation_id="listDomains"),
            Route("POST", f"{V1}/domains", self.add_domain, "Add a local domain", "domains",
                  body=js.DOMAIN_IN, response=js.DOMAIN_OUT, status=201, errors=(409,),
                  operation_id="addDomain",
                  links=[("removeDomain", {"domain": "$response.body#/name"})]),
            Route("DELETE", f"{V1}/domains/{{domain}}", self.remove_domain,
                  "Remove a domain with its users, aliases and mail", "domains",
                  params=(domain,), status=204, errors=(404,), operation_id="removeDomain"),
            Route("GET", f"{V1}/users", self.list_users, "Users", "users",
                  params=(DOMAIN_FILTER,), response=js.array(js.USER_OUT), errors=(404,),
                  operation_id="listUsers"),
            Route("POST", f"{V1}/users", self.add_user, "Add a user", "users",
                  body=js.USER_IN, response=js.USER_OUT, status=201, errors=(404, 409),
                  operation_id="addUser", links=of_user),
            Route("GET", f"{V1}/users/{{address}}", self.show_user, "One user", "users",
                  params=(ADDRESS,), response=js.USER_OUT, errors=(404,),
                  operation_id="showUser"),
            Route("PATCH", f"{V1}/users/{{address}}", self.change_user,
                  "Reset the password, change the quota, enable, disable, expire the "
                  "password", "users", params=(ADDRESS,), body=js.USER_CHANGE,
                  response=js.USER_OUT, errors=(404,), operation_id="changeUser"),
            Route("DELETE", f"{V1}/users/{{address}}", self.remove_user,
                  "Remove a user and their mail", "users", params=(ADDRESS,), status=204,
                  errors=(404,), operation_id="removeUser"),
            Route("GET", f"{V1}/users/{{address}}/app-passwords", self.list_app_passwords,
                  "A user's app passwords", "users", params=(ADDRESS,),
                  response=js.array(js.APP_PASSWORD_OUT), errors=(404,),
                  operation_id="listAppPasswords"),
            Route("POST", f"{V1}/users/{{address}}/app-passwords", self.add_app_password,
                  "Make an app password (its secret is shown only in this answer)",
                  "users", params=(ADDRESS,), body=js.APP_PASSWORD_IN,
                  response=js.APP_PASSWORD_MADE, status=201, errors=(404, 409),
                  operation_id="addAppPassword", links=[("revokeAppPassword", {
                      "address": "$request.path.address",
                      "name": "$response.body#/name"})]),
            Route("DELETE", f"{V1}/users/{{address}}/app-passwords/{{name}}",
                  self.revoke_app_password, "Revoke an app password", "users",
                  params=(ADDRESS, Param("name", "path", js.TEXT, "its name")),
                  status=204, errors=(404,), operation_id="revokeAppPassword"),
            Route("GET", f"{V1}/aliases", self.list_aliases, "Aliases and catch-alls",
                  "aliases", params=(DOMAIN_FILTER,), response=js.array(js.ALIAS),
                  errors=(404,), operation_id="listAliases"),
            Route("POST", f"{V1}/aliases", self.add_alias, "Add an alias (one "
                  "destination; several rows expand to several)", "aliases",
                  body=js.ALIAS, response=js.ALIAS, status=201, errors=(404, 409),
                  operation_id="addAlias", links=[("removeAlias", {
                      "source": "$response.body#/source",
                      "destination": "$response.body#/destination"})]),
            Route("DELETE", f"{V1}/aliases/{{source}}", self.remove_alias,
                  "Remove an alias: every destination, or the one given", "aliases",
                  params=(source, Param("destination", "query", js.ADDRESS,
                                        "only this destination")),
                  response=removed, errors=(404,), operation_id="removeAlias"),
        ]


def _user(user: User, login: Any) -> dict[str, Any]:
    return {"address": user.address, "quota": user.quota_bytes, "enabled": user.enabled,
            "last_login": login.when if login else None,
            "last_login_from": login.source if login else None}


def _app_password(found: AppPassword) -> dict[str, Any]:
    return {"name": found.name, "protocols": list(found.protocols),
            "created": found.created, "last_used": found.last_used}
