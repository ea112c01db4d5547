"""A stand-in Grafana for the chaos and soak suites, run as its own process.

``python -m tests.reliability.standin PORT``: answers every request with a small JSON
description of it and closes the connection (no keep-alive, so the bridge's delegate pool holds
no idle connection when the suites count its fds). A process of its own, so the suites can stop
and start "Grafana" as abruptly as a real one goes away, without racing the test's event loop.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def answer(request: web.Request) -> web.Response:
    await request.read()
    response = web.json_response({"grafana": "stand-in", "path": request.path})
    response.force_close()
    return response


def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
