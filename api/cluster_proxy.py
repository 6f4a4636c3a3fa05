"""What Ray Serve's proxies add for lockstep: a call cut by its replica's death ends clearly.

When a replica dies (its process killed, its node gone), the proxy just stops a response it had
begun. This ASGI middleware, run in every proxy, finishes such a response the way lockstep ends a
session: an NDJSON stream (/v1/chat, a REST session's stream) gets a last
`{"type": "end", "reason": "replica_lost"}` line, a websocket (/api/chat) a close frame with code
1011 and reason "replica_lost". The caller then knows its call is over (and, for REST sessions,
that later requests answer 410).

`lockstep serve --ray` installs it when it starts Serve; with Serve's own config files set
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=api.cluster_proxy:proxy_middlewares on every node.
"""
from __future__ import annotations

import json

REPLICA_LOST = "replica_lost"
END_LINE = (json.dumps({"type": "end", "reason": REPLICA_LOST}) + "\n").encode()


class ReplicaLossMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        seen = {"started": False, "ndjson": False, "done": False}

        async def watching_send(message):
            kind = message["type"]
            if kind == "http.response.start":
                headers = dict(message.get("headers") or [])
                seen["started"] = True
                seen["ndjson"] = message.get("status") == 200 and headers.get(b"content-type", b"").startswith(
                    b"application/x-ndjson")
            elif kind == "http.response.body" and not message.get("more_body", False):
                seen["done"] = True
            elif kind == "websocket.accept":
                seen["started"] = True
            elif kind == "websocket.close":
                seen["done"] = True
            await send(message)

        await self.app(scope, receive, watching_send)
        if not seen["started"] or seen["done"]:
            return
        try:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1011, "reason": REPLICA_LOST})
            else:
                await send({"type": "http.response.body", "body": END_LINE if seen["ndjson"] else b"",
                            "more_body": False})
        except Exception:  # the caller has gone too: nobody is left to tell
            pass


def proxy_middlewares() -> list:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (Serve calls it in each proxy)."""
    from starlette.middleware import Middleware
    return [Middleware(ReplicaLossMiddleware)]
