"""``GET /api/v1/dkim/keys``: the DKIM signing keys in use, with the DNS record each
needs (what ``lightmail dkim records`` prints)."""

from __future__ import annotations

from typing import Any

from twisted.internet import threads

from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import Call, Route
from lightmail.policy import dkim

V1 = "/api/v1"


class DkimKeys:
    def __init__(self, services: Any) -> None:
        self.services = services

    async def listing(self, call: Call) -> Any:
        # The key files are read again: what the API shows is what is on disk now.
        signer = await threads.deferToThread(dkim.load_signer, self.services.config)
        if signer is None:
            return []
        return [{"domain": key.domain, "selector": key.selector,
                 "algorithm": key.algorithm, "bits": key.bits,
                 "record_name": f"{key.selector}._domainkey.{key.domain}",
                 "record": dkim.dns_record(key), "path": str(key.path or "")}
                for keys in signer.keys.values() for key in keys]

    def routes(self) -> list[Route]:
        return [Route("GET", f"{V1}/dkim/keys", self.listing, "The DKIM signing keys in use "
                      "and their DNS records", "dkim", response=js.array(js.DKIM_KEY),
                      operation_id="listDkimKeys")]
