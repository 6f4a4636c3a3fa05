"""The web page at `/`: plain static files shipped in the package (api/static/), no build step and
nothing fetched at run time, talking to Moshi over `/v1/realtime`. `--static DIR` serves DIR instead
(Kyutai's own web UI, say)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.bridge import SessionRegistry

PAGE = Path(__file__).with_name("static")


def add_web_page(app: FastAPI, registry: SessionRegistry) -> None:
    @app.get("/page-config.json")
    async def page_config():
        """What the page asks before a call: whether to show a key field, and the settings a call gets
        when it leaves them unset (the checkpoint's)."""
        return {"api_key_required": bool(registry.cfg.api_key),
                "sampling": dataclasses.asdict(registry.defaults)}

    app.mount("/", StaticFiles(directory=registry.cfg.static or PAGE, html=True), name="static")
