"""The ceiling for the HTTP side: an aiohttp handler that only parses the JSON and answers 200.

Run as `python -m bench.bare PORT`; the benchmarks start it like `flowbot serve`
(same aiohttp, same event loop, same access log setting, same JSON answer).
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

from bot.server import new_event_loop

OK = b'{"status": "ok", "outcome": "success"}'


async def callback(request: web.Request) -> web.Response:
    doc = json.loads(await request.read())
    if not isinstance(doc, dict):
        raise web.HTTPBadRequest()
    return web.Response(body=OK, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app.router.add_post("/webview/callback", callback)
    app.router.add_post("/webhook", callback)
    app.router.add_post("/webhook/{key}", callback)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=new_event_loop())


if __name__ == "__main__":
    main()
