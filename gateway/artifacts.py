"""Artifacts: files tasks make, stored by the gateway and served by signed links.

A worker uploads an artifact as a signed call (it has no disk in common with
the gateway and never writes the database). The gateway writes the file under
``ARTIFACT_DIR``, records it, and answers with a link
``GET /api/v1/artifacts/{token}``: the token is an itsdangerous timed
signature of the artifact's ID, so a browser can show the image without an
API key, and a tampered (403) or expired (410) link gives nothing away.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from db.ids import new_id
from db.models import Artifact, Run
from db.types import utcnow
from gateway.bodies import signed_body
from gateway.errors import APIError, BadRequest, NotFound, ValidationFailed
from gateway.services import Services
from gateway.views import ArtifactLink, shaped
from jobs.protocol import ARTIFACT_FETCH_PATH, ARTIFACTS_PATH

__all__ = ["ArtifactStore", "routes"]

artifacts = Artifact.__table__  # type: ignore[attr-defined]
runs = Run.__table__  # type: ignore[attr-defined]

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
}
#: The first bytes of each kind of artifact the gateway keeps. Anything else
#: (HTML, SVG, a script) is refused at upload: an artifact is served from the
#: gateway's own origin, where the dashboard's cookie lives.
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
#: How an artifact is served: never sniffed, never run, never a page.
_SERVE_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "sandbox; default-src 'none'",
    "cross-origin-resource-policy": "cross-origin",
}


def _image_type(content_type: str, data: bytes) -> str:
    """``content_type`` if it is an image type the gateway keeps and ``data``
    starts as such an image does; else a 422."""
    magic = _MAGIC.get(content_type)
    if magic is None:
        raise ValidationFailed(
            f"an artifact is an image ({', '.join(_MAGIC)}), not {content_type!r}",
            code="unsupported_artifact_type",
        )
    webp = content_type != "image/webp" or data[8:12] == b"WEBP"
    if not data.startswith(magic) or not webp:
        raise ValidationFailed(
            f"the data is not a {content_type} image", code="unsupported_artifact_type"
        )
    return content_type


class Forbidden(APIError):
    status_code, code, message = 403, "invalid_token", "the link is not valid"


class Gone(APIError):
    status_code, code, message = 410, "link_expired", "the link has expired"


class ArtifactStore:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.root = settings.artifact_path
        self.ttl = settings.artifact_url_ttl
        self.public_url = settings.public_url
        self.signer = URLSafeTimedSerializer(settings.require_secret(), salt="gateway.artifact")

    def url(self, artifact_id: str) -> str:
        return self.public_url + self.path(artifact_id)

    def path(self, artifact_id: str) -> str:
        """The signed link without the host, for pages served by this gateway."""
        return f"/api/v1/artifacts/{self.signer.dumps(artifact_id)}"

    def artifact_of(self, token: str) -> str:
        try:
            artifact_id = self.signer.loads(token, max_age=self.ttl)
        except SignatureExpired:
            raise Gone() from None
        except BadSignature:
            raise Forbidden() from None
        return str(artifact_id)

    async def store(
        self, run_id: str, content_type: str, data: bytes, width: int | None, height: int | None
    ) -> dict[str, Any]:
        project_id = await self.services.db.read(
            lambda conn: conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
        )
        if project_id is None:
            raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
        artifact_id = new_id("art")
        relative = Path(project_id) / f"{artifact_id}{_EXTENSIONS.get(content_type, '.bin')}"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        digest = hashlib.sha256(data).hexdigest()
        row = {
            "id": artifact_id,
            "project_id": project_id,
            "run_id": run_id,
            "content_type": content_type,
            "bytes": len(data),
            "sha256": digest,
            "width": width,
            "height": height,
            "path": str(relative),
            "created_at": utcnow(),
        }
        await self.services.db.write(lambda conn: conn.execute(artifacts.insert(), row))
        return {
            "artifact_id": artifact_id,
            "url": self.url(artifact_id),
            "bytes": len(data),
            "sha256": digest,
        }

    async def find(self, artifact_id: str, project_id: str | None = None) -> dict[str, Any]:
        def select(conn: sa.Connection) -> dict[str, Any] | None:
            query = sa.select(artifacts).where(artifacts.c.id == artifact_id)
            if project_id is not None:
                query = query.where(artifacts.c.project_id == project_id)
            row = conn.execute(query).mappings().first()
            return dict(row) if row is not None else None

        row = await self.services.db.read(select)
        if row is None or not (self.root / row["path"]).is_file():
            raise NotFound(f"no artifact with id {artifact_id!r}", code="artifact_not_found")
        return row


def _store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifacts
    return store


async def _signed_body(request: Request, max_bytes: int) -> bytes:
    services: Services = request.app.state.services
    return await signed_body(request, services.settings, max_bytes)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"{name} must be a whole number")
    return int(raw)


async def upload(request: Request) -> Response:
    """A worker stores an artifact (signed; the body is the file)."""
    store = _store(request)
    data = await _signed_body(request, store.services.settings.max_artifact_bytes)
    run_id = request.query_params.get("run_id")
    if not run_id:
        raise BadRequest("run_id is required")
    content_type = _image_type(request.query_params.get("content_type", ""), data)
    stored = await store.store(
        run_id, content_type, data, _int_param(request, "width"), _int_param(request, "height")
    )
    return JSONResponse(stored, status_code=201)


async def fetch(request: Request) -> Response:
    """A worker reads an upstream artifact (signed; the body is its ID).

    Only an artifact of the same project as the asking run is handed out.
    """
    store = _store(request)
    artifact_id = (await _signed_body(request, 200)).decode(errors="replace").strip()
    run_id = request.query_params.get("run_id", "")
    project_id = await store.services.db.read(
        lambda conn: conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
    )
    if project_id is None:
        raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
    row = await store.find(artifact_id, project_id)
    return _file(store, row)


def _file(store: ArtifactStore, row: dict[str, Any], **headers: str) -> FileResponse:
    """The artifact's file, served as the image it is and nothing else (a file
    stored before uploads were checked is a download, never a page)."""
    content_type = row["content_type"]
    if content_type not in _MAGIC:
        content_type = "application/octet-stream"
        headers["content-disposition"] = "attachment"
    return FileResponse(
        store.root / row["path"], media_type=content_type, headers={**_SERVE_HEADERS, **headers}
    )


async def download(request: Request) -> Response:
    """Anyone with a valid link gets the file."""
    store = _store(request)
    row = await store.find(store.artifact_of(request.path_params["token"]))
    return _file(store, row, **{"cache-control": "private, max-age=3600"})


async def fresh_link(request: Request) -> Response:
    """A new signed link for one of the project's artifacts."""
    store = _store(request)
    principal = await store.services.auth.authenticate(request)
    row = await store.find(request.path_params["artifact_id"], principal.project_id)
    return shaped(
        ArtifactLink,
        {
            "artifact_id": row["id"],
            "url": store.url(row["id"]),
            "content_type": row["content_type"],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
            "width": row["width"],
            "height": row["height"],
            "run_id": row["run_id"],
        },
    )


routes = [
    Route(ARTIFACTS_PATH, upload, methods=["POST"]),
    Route(ARTIFACT_FETCH_PATH, fetch, methods=["POST"]),
    Route("/api/v1/artifacts/{artifact_id:str}/link", fresh_link, methods=["GET"]),
    Route("/api/v1/artifacts/{token:str}", download, methods=["GET"]),
]
