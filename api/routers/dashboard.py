"""The dashboard: static HTML/JS at ``/`` that reads the /v1 API with a key the user types once.

The page itself needs no key (it is the same for everyone and holds no data); every number on it
comes from an authenticated /v1 call made by the browser. The files are package data under
``api/static/`` and the charting library is vendored there, so the dashboard works offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = (Path(__file__).resolve().parent.parent / "static").resolve()

router = APIRouter(tags=["dashboard"])

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# Vendored files never change under the same name; our own files may change with a release.
_VENDOR_CACHE = "public, max-age=86400"
_OWN_CACHE = "no-cache"


def static_path(relative: str) -> Path:
    """The file under ``api/static`` named by ``relative``; 404 for anything outside it."""
    candidate = (STATIC_DIR / relative).resolve()
    if not candidate.is_relative_to(STATIC_DIR) or not candidate.is_file():
        raise HTTPException(404, f"path: no such dashboard file {relative!r}")
    return candidate


def _file(path: Path) -> FileResponse:
    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    vendored = "vendor" in path.relative_to(STATIC_DIR).parts
    return FileResponse(
        path,
        media_type=media_type,
        headers={"Cache-Control": _VENDOR_CACHE if vendored else _OWN_CACHE},
    )


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The dashboard page (no key needed to load it; it asks for one to fetch data)."""
    return _file(static_path("index.html"))


@router.get("/dashboard", include_in_schema=False)
async def dashboard_alias() -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


@router.get("/static/{relative:path}", include_in_schema=False)
async def static_file(relative: str) -> FileResponse:
    return _file(static_path(relative))


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return _file(static_path("favicon.svg"))
