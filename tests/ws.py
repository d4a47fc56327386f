"""A real WebSocket client and server (the `websockets` library) for
tests/tests/proxy_websocket.rs.

    ws.py server PORT
        An app on 127.0.0.1:PORT. On a connection it first sends what it saw
        of the handshake as JSON (path, host, x-forwarded-client-cert, the
        x-keyproof-step-up fields), then
        echoes every message; the close code it got is appended to the file
        named by WS_CLOSES, if set. A path under /reject is declined with 404;
        one under /ask asks for a step-up proof (x-keyproof-step-up:
        required) unless the handshake carries x-keyproof-step-up: verified.
        Prints "ready" once it listens.

    ws.py client OUT_PORT HOST PATH [MESSAGES]
        Connects to ws://HOST/PATH through the sidecar at 127.0.0.1:OUT_PORT
        (as an app whose HTTP is redirected there would), reads the server's
        JSON, sends MESSAGES text messages and one 1 MiB binary message,
        checks each echo and closes with code 1000. Prints one JSON line:
        {"seen": ..., "echoed": N, "big": true} or, if the handshake was
        refused, {"status": CODE, "body": TEXT}. With WS_VIA_PROXY set, it
        connects as an app told HTTP_PROXY=http://127.0.0.1:OUT_PORT does:
        through a CONNECT tunnel to HOST, which the library asks for (a
        refused tunnel prints {"proxy_status": CODE}).
"""

import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidProxyStatus, InvalidStatus


async def server(port):
    async def handler(ws):
        req = ws.request
        seen = {
            "path": req.path,
            "host": req.headers.get("Host"),
            "xfcc": req.headers.get("x-forwarded-client-cert"),
            "stepup": req.headers.get("x-keyproof-step-up"),
            "stepup_reason": req.headers.get("x-keyproof-step-up-reason"),
        }
        await ws.send(json.dumps(seen))
        try:
            async for msg in ws:
                await ws.send(msg)
        except ConnectionClosed:
            pass
        closes = os.environ.get("WS_CLOSES")
        if closes:
            with open(closes, "a") as f:
                f.write(f"{ws.close_code}\n")

    def process_request(conn, request):
        if request.path.startswith("/reject"):
            return conn.respond(404, "no such socket here\n")
        if request.path.startswith("/ask") and request.headers.get("x-keyproof-step-up") != "verified":
            # A proof of this one event, from the caller's sidecar.
            resp = conn.respond(409, "prove it\n")
            resp.headers["x-keyproof-step-up"] = "required"
            return resp
        return None

    async with serve(handler, "127.0.0.1", port, process_request=process_request, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


async def client(out_port, host, path, messages):
    if os.environ.get("WS_VIA_PROXY"):
        # The library's own proxy support, as an app configured by its
        # environment gets it.
        os.environ["HTTP_PROXY"] = f"http://127.0.0.1:{out_port}"
        where = {}
    else:
        where = {"host": "127.0.0.1", "port": out_port, "proxy": None}
    try:
        async with connect(
            f"ws://{host}{path}",
            max_size=None,
            open_timeout=10,
            **where,
        ) as ws:
            seen = json.loads(await asyncio.wait_for(ws.recv(), 10))
            echoed = 0
            for i in range(messages):
                text = f"message {i}"
                await ws.send(text)
                if await asyncio.wait_for(ws.recv(), 10) == text:
                    echoed += 1
            big = os.urandom(1024 * 1024)
            await ws.send(big)
            back = await asyncio.wait_for(ws.recv(), 30)
            await ws.close(1000)
            print(json.dumps({"seen": seen, "echoed": echoed, "big": back == big}))
    except InvalidStatus as e:
        body = e.response.body.decode(errors="replace") if e.response.body else ""
        print(json.dumps({"status": e.response.status_code, "body": body}))
    except InvalidProxyStatus as e:
        # The proxy refused the tunnel.
        print(json.dumps({"proxy_status": e.response.status_code}))


def main():
    if sys.argv[1] == "server":
        asyncio.run(server(int(sys.argv[2])))
    else:
        messages = int(sys.argv[5]) if len(sys.argv) > 5 else 3
        asyncio.run(client(int(sys.argv[2]), sys.argv[3], sys.argv[4], messages))


if __name__ == "__main__":
    main()
