"""The web chat page at ``/`` (llama-server serves its UI there): one HTML file with its script
and style inline, shipped as package data, nothing fetched from elsewhere (the machines may have
no internet). The page streams from /v1/chat/completions and shows /props and the nodes (/health,
/metrics). It holds no secrets, so it is served without a key, as llama-server serves its UI;
every API call it makes carries the key the user types (`--api-key` applies there).
``--no-webui`` leaves the router out: ``/`` is then a 404.

The Content-Security-Policy allows only the page's own script (by its hash), its own origin for
fetches, and no frames or forms: even if a rendering bug let model output become markup, it could
not run script or send data elsewhere. The page itself never parses model output as HTML."""
from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

router = APIRouter()

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and the headers it is served with."""
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in _SCRIPT.findall(html))
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-cache"}
    return html.encode("utf-8"), headers


@router.get("/")
@router.get("/index.html")
async def index() -> Response:
    body, headers = page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)
