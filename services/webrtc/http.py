"""The HTTP face of edgeroom-webrtc (aiohttp on the service's loop): routes, tokens, CORS, errors.

| method | path | what | token |
|---|---|---|---|
| GET | `/`, `/app.js`, `/style.css` | the web page (static files: no token; it asks for one) | none |
| GET | `/api/streams`, `/api/rooms`, `/api/status` | the hub's `streams`, `rooms`, `status` | `api` |
| GET | `/api/webrtc` | this service's peer connections and WebSockets | `api` |
| GET | `/api/events` | the event plane as Server-Sent Events | `events` (`?access_token=` accepted) |
| POST | `/whip/{name}[?room=R]` | WHIP: publish as session NAME (streams NAME, NAME-audio) | `whip` |
| POST | `/whep/{stream}` | WHEP: play a stream of the bus | `whep` |
| POST | `/rooms/{room}/call[?session=NAME]` | a room call: publish and receive the session's routes | `rooms` |
| PATCH | the Location of any of the three | trickle ICE (application/trickle-ice-sdpfrag) | same |
| DELETE | the Location of any of the three | end it | same |
| GET | `/ws/{room}/{session}` | WebSocket video, RoomKit's format (docs/websocket.md) | `ws` (`?access_token=`) |

Every endpoint takes `Authorization: Bearer TOKEN` (a token of [webrtc] tokens or of
`edgeroom keys token add`) unless [webrtc] open names it. EventSource and WebSocket cannot
send headers in a browser, so those two also take `?access_token=`. A refusal is JSON
`{"error": "...", "reason": "..."}` with the HTTP status that says it (400 bad offer, 401
token, 404 unknown, 406 no common codec, 409 name taken, 413 too large, 415 not SDP, 503 full),
and is counted (`edgeroom_webrtc_refused_total{reason}`).
"""
from __future__ import annotations

import asyncio
import re
from importlib import resources
from typing import Any

from aiohttp import web

__all__ = ["HttpError", "make_app"]

_ENDPOINT = (("/api/events", "events"), ("/api/", "api"), ("/whip/", "whip"), ("/whep/", "whep"),
             ("/rooms/", "rooms"), ("/ws/", "ws"))
_PAGE_FILES = {"/": ("index.html", "text/html"), "/index.html": ("index.html", "text/html"),
               "/app.js": ("app.js", "text/javascript"), "/style.css": ("style.css", "text/css")}
NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_NAME = re.compile(f"^{NAME}$")


class HttpError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def endpoint_of(path: str) -> str:
    for prefix, name in _ENDPOINT:
        if path.startswith(prefix):
            return name
    return "page"


def check_name(what: str, name: str) -> str:
    if not _NAME.match(name):
        raise HttpError(400, "bad_name", f"{what} {name[:80]!r} is not a stream name (letters, digits, _ and -; "
                                         "1-64, starting with a letter or digit)")
    return name


def make_app(svc: Any) -> web.Application:
    """The application; `svc` is the service (services/webrtc/service.py) that does the work."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        endpoint = endpoint_of(request.path)
        cors = svc.cfg.cors_origins
        try:
            if request.method == "OPTIONS":
                response: web.StreamResponse = web.Response(status=204)
            else:
                if endpoint != "page" and endpoint not in svc.open_endpoints:   # the page's files hold no data
                    header = request.headers.get("Authorization", "")
                    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
                    if not token and endpoint in ("events", "ws"):
                        token = request.query.get("access_token", "")
                    who = svc.tokens.check(token)
                    if who is None:
                        raise HttpError(401, "token", "a valid bearer token is needed (Authorization: Bearer "
                                        "TOKEN)" if not token else "the bearer token is not valid")
                    request["token_name"] = who
                response = await handler(request)
        except HttpError as exc:
            svc.m.refused.labels(exc.reason).inc()
            response = web.json_response({"error": exc.message, "reason": exc.reason}, status=exc.status)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="edgeroom"'
        except web.HTTPException as exc:
            response = web.json_response({"error": exc.reason, "reason": "http"}, status=exc.status)
        except Exception as exc:   # a bug: answered 500 and logged with its traceback; the service goes on
            svc.log.exception("%s %s failed", request.method, request.path)
            svc.m.refused.labels("internal").inc()
            response = web.json_response({"error": f"internal error: {exc.__class__.__name__}", "reason": "internal"},
                                         status=500)
        if cors and endpoint in ("whip", "whep", "rooms", "api", "events") and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = cors
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
            response.headers["Access-Control-Expose-Headers"] = "Location, Link, ETag"
        svc.m.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def page(request: web.Request) -> web.StreamResponse:
        name, kind = _PAGE_FILES[request.path]
        body = resources.files("services.webrtc").joinpath("web", name).read_bytes()
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})

    async def sdp_body(request: web.Request, types: tuple[str, ...] = ("application/sdp",)) -> str:
        if request.content_type not in types:
            raise HttpError(415, "content_type", f"the body must be {' or '.join(types)}, not "
                                                 f"{request.content_type or 'untyped'}")
        if (request.content_length or 0) > svc.cfg.max_offer_bytes:
            raise HttpError(413, "too_large", f"the body is over {svc.cfg.max_offer_bytes} bytes")
        body = await request.content.read(svc.cfg.max_offer_bytes + 1)
        if len(body) > svc.cfg.max_offer_bytes:
            raise HttpError(413, "too_large", f"the body is over {svc.cfg.max_offer_bytes} bytes")
        try:
            return body.decode()
        except UnicodeDecodeError:
            raise HttpError(400, "bad_offer", "the body is not UTF-8 text") from None

    def created(session: Any, answer: str, base: str) -> web.Response:
        location = f"{base}/{session.id}"
        return web.Response(status=201, body=answer.encode(), content_type="application/sdp",
                            headers={"Location": location, "ETag": f'"{session.id}"'})

    async def whip(request: web.Request) -> web.StreamResponse:
        name = check_name("the session", request.match_info["name"])
        room = request.query.get("room", svc.cfg.room)
        check_name("the room", room)
        session, answer = await svc.publish(name, room, await sdp_body(request), request.get("token_name", ""))
        return created(session, answer, f"/whip/{name}")

    async def whep(request: web.Request) -> web.StreamResponse:
        stream = check_name("the stream", request.match_info["stream"])
        session, answer = await svc.view(stream, await sdp_body(request), request.get("token_name", ""))
        return created(session, answer, f"/whep/{stream}")

    async def call(request: web.Request) -> web.StreamResponse:
        room = check_name("the room", request.match_info["room"])
        name = request.query.get("session") or ""
        if name:
            check_name("the session", name)
        session, answer = await svc.room_call(room, name, await sdp_body(request), request.get("token_name", ""))
        return created(session, answer, f"/rooms/{room}/call")

    async def patch(request: web.Request) -> web.StreamResponse:
        session = svc.find(request.match_info["id"])
        body = await sdp_body(request, ("application/trickle-ice-sdpfrag",))
        try:
            await session.add_candidates(body)
        except Exception as exc:   # aioice's parser raises whatever a malformed line makes it meet
            raise HttpError(400, "bad_candidate", f"a candidate line does not parse: {exc.__class__.__name__}: "
                                                  f"{exc}") from None
        return web.Response(status=204)

    async def delete(request: web.Request) -> web.StreamResponse:
        session = svc.find(request.match_info["id"])
        await svc.end(session, "deleted")
        return web.Response(status=200)

    async def api(request: web.Request) -> web.StreamResponse:
        what = request.match_info["what"]
        if what == "webrtc":
            return web.json_response(svc.listing())
        if what not in ("streams", "rooms", "status"):
            raise HttpError(404, "not_found", f"no /api/{what[:40]} (streams, rooms, status, webrtc, events)")
        return web.json_response(await svc.hub(what))

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        if svc.cfg.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = svc.cfg.cors_origins
        await response.prepare(request)
        await response.write(b": edgeroom events\n\n")
        q = svc.events.join()
        try:
            while True:
                try:
                    message = await asyncio.wait_for(q.get(), 15.0)
                except TimeoutError:
                    message = b": keep-alive\n\n"
                await response.write(message)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            svc.events.leave(q)
        return response

    async def ws(request: web.Request) -> web.StreamResponse:
        room = check_name("the room", request.match_info["room"])
        session = check_name("the session", request.match_info["session"])
        return await svc.websocket(request, room, session)

    app = web.Application(middlewares=[guard], client_max_size=svc.cfg.max_offer_bytes + 1024)
    for path in _PAGE_FILES:
        app.router.add_get(path, page)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/{what}", api)
    for base, handler in ((f"/whip/{{name:{NAME}}}", whip), (f"/whep/{{stream:{NAME}}}", whep),
                          (f"/rooms/{{room:{NAME}}}/call", call)):
        app.router.add_post(base, handler)
        app.router.add_patch(base + "/{id}", patch)
        app.router.add_delete(base + "/{id}", delete)
        app.router.add_route("OPTIONS", base, handler)
        app.router.add_route("OPTIONS", base + "/{id}", delete)
    app.router.add_get(f"/ws/{{room:{NAME}}}/{{session:{NAME}}}", ws)
    return app

