"""The web console: its static files (``src/gb28181/web/``) and the settings it reads.

- ``GET /``: the console (``web/index.html``); ``GET /console/...``: its script, style and the
  JavaScript libraries vendored under ``web/vendor/`` (pinned npm releases with their licences,
  listed in ``web/vendor/README.md``). These are public: they hold no data, and the console signs
  in through ``/api/v1/session`` (or an API token) before it asks the API for anything.
- ``GET /api/v1/console/config``: what the console needs beyond the API: the map's tile URL
  template (``console.tiles_url`` in the config; ``""``: no tiles, the channels are still drawn
  as points on a blank map; the console's ``?tiles=`` URL parameter overrides it) and the
  online-rate targets per tier.

The console itself is plain JavaScript in the browser, same origin as the API; nothing here
needs Node at set-up or run time. Its neighbours: ``api.py`` (the routes it calls), and
``api_video.py`` / the WHEP routes whose URLs it plays.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .api import _server
from .reports import TIER_TARGETS

__all__ = ["add_console_routes", "WEB_DIR"]

WEB_DIR = Path(__file__).with_name("web")

#: The console's pages fetch from this origin and from the media nodes (other ports, so any
#: http/ws origin); map tiles come from whatever host the tile URL names.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob: http: https:; media-src 'self' blob:; "
        "connect-src 'self' http: https: ws: wss:; worker-src 'self' blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    # A console opened with ?token= must not leak it to the tile server in a Referer.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def console_index(request: web.Request) -> web.FileResponse:
    """The web console's page (public: it holds no data and signs in before it asks for any)."""
    return web.FileResponse(WEB_DIR / "index.html", headers=_HEADERS)


async def console_config(request: web.Request) -> web.Response:
    """Tile URL template (``{z}/{x}/{y}``; "" for none), its attribution, the tier targets."""
    console = _server(request).config.console
    return web.json_response({
        "tiles_url": console.tiles_url,
        "tiles_attribution": console.tiles_attribution,
        "tier_targets": {str(tier): target for tier, target in TIER_TARGETS.items()},
    })


def add_console_routes(app: web.Application) -> None:
    app.router.add_get("/", console_index)
    app.router.add_get("/api/v1/console/config", console_config)
    # aiohttp's static route refuses paths that leave the directory and answers
    # If-Modified-Since; symlinks are not followed.
    app.router.add_static("/console/", WEB_DIR, follow_symlinks=False, append_version=False)
