"""Fake Telegram Bot API and Twilio Messages API for the inbound benchmark: answers like
the real ones, counts what was sent. Run as `python -m bench.fakeapi PORT`."""

from __future__ import annotations

import sys
import time
from collections import Counter

from aiohttp import web

BOT_USER = {"id": 123456789, "is_bot": True, "first_name": "Flowbot Bench",
            "username": "flowbot_bench_bot", "can_join_groups": True,
            "can_read_all_group_messages": False, "supports_inline_queries": False}
sent: Counter[str] = Counter()


async def telegram(request: web.Request) -> web.Response:
    method = request.match_info["method"]
    params = dict(await request.post()) if request.can_read_body else {}
    if method == "getMe":
        result: object = BOT_USER
    elif method == "sendMessage":
        sent["telegram"] += 1
        chat = int(str(params.get("chat_id", "0")))
        result = {"message_id": sent["telegram"], "date": int(time.time()),
                  "chat": {"id": chat, "type": "private"}, "text": str(params.get("text", ""))}
    else:
        result = True
    return web.json_response({"ok": True, "result": result})


async def twilio(request: web.Request) -> web.Response:
    form = await request.post()
    sent["whatsapp"] += 1
    sid = f"SM{sent['whatsapp']:032x}"
    return web.json_response({"sid": sid, "status": "queued", "to": form.get("To"),
                              "from": form.get("From"), "body": form.get("Body", ""),
                              "account_sid": request.match_info["account"],
                              "num_segments": "1", "direction": "outbound-api"}, status=201)


async def counts(request: web.Request) -> web.Response:
    return web.json_response(dict(sent))


def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/bot{token}/{method}", telegram)
    app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", twilio)
    app.router.add_get("/counts", counts)
    app.router.add_get("/healthz", counts)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
