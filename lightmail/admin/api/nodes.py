"""The admin API's nodes: the nodes sharing the database, as ``lightmail node list``
shows them, and a drain asked of one (``lightmail node drain``; the node notices at
its next heartbeat, drains as on SIGTERM and stops)."""

from __future__ import annotations

import time
from typing import Any

from lightmail.admin.api import schemas as js
from lightmail.admin.api.routing import ApiError, Call, Param, Route
from lightmail.directory.interfaces import NotFound
from lightmail.storage.interfaces import INodeStore, NodeRecord

V1 = "/api/v1"
NODE_ID = Param("node_id", "path", {"type": "string", "minLength": 1, "maxLength": 64},
                "the node's [server] node_id")


class Nodes:
    def __init__(self, services: Any) -> None:
        self.services = services

    @property
    def store(self) -> INodeStore:
        return self.services.storage.nodes      # type: ignore[no-any-return]

    async def listing(self, call: Call) -> Any:
        now = int(time.time() * 1000)
        return [node_json(node, now) for node in await self.store.nodes()]

    async def drain(self, call: Call) -> Any:
        node_id = call.params["node_id"]
        now = int(time.time() * 1000)
        node = await self.store.request_drain(node_id, now)
        if node is None:
            raise NotFound(f"no node {node_id}")
        if node.state not in ("running", "draining"):
            raise ApiError(409, f"node {node_id} is {node.state}: nothing to drain")
        return node_json(node, now)

    def routes(self) -> list[Route]:
        return [
            Route("GET", f"{V1}/nodes", self.listing, "The nodes sharing the database, "
                  "their state, heartbeat and queue leases", "nodes",
                  response=js.array(js.NODE), operation_id="listNodes"),
            Route("POST", f"{V1}/nodes/{{node_id}}/drain", self.drain, "Ask a node to "
                  "drain and stop (it notices at its next heartbeat)", "nodes",
                  params=(NODE_ID,), response=js.NODE, status=202, errors=(404, 409),
                  operation_id="drainNode"),
        ]


def node_json(node: NodeRecord, now: int) -> dict[str, Any]:
    return {"node_id": node.node_id, "host": node.host, "pid": node.pid,
            "state": node.state, "version": node.version, "started": node.started,
            "heartbeat": node.heartbeat,
            "heartbeat_age": round(max(0, now - node.heartbeat) / 1000, 3),
            "drain_requested": node.drain_requested, "leases": node.leases}
