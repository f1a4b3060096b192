"""Artifacts: files tasks make, kept by the gateway and served by signed links.

A worker uploads an artifact as a signed call (it has no disk in common with
the gateway and never writes the database). The gateway keeps the bytes,
records the artifact, and answers with a link ``GET /api/v1/artifacts/{token}``:
the token is an itsdangerous timed signature of the artifact's ID, so a browser
can show the image without an API key, and a tampered (403) or expired (410)
link gives nothing away.

Where the bytes go is ``ARTIFACT_STORE``: ``local`` writes a file under
``ARTIFACT_DIR`` (one gateway host: the embedded default); ``database`` writes
them to ``artifact_blobs`` in the database of record, so any gateway host serves
any artifact (docs/architecture.md, "Several hosts"). Each artifact's row says
where its bytes are, so a store that changes setting still serves older ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from starlette.responses import FileResponse, Response

from db.engine import Database
from db.ids import new_id
from db.models import Artifact, ArtifactBlob, Run
from db.types import utcnow
from gateway.errors import APIError, NotFound, ValidationFailed
from gateway.runs.errors import RunNotFound
from gateway.settings import Settings

__all__ = ["ArtifactStore", "image_type"]

artifacts = Artifact.__table__  # type: ignore[attr-defined]
blobs = ArtifactBlob.__table__  # type: ignore[attr-defined]
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
MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
#: How an artifact is served: never sniffed, never run, never a page.
SERVE_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "sandbox; default-src 'none'",
    "cross-origin-resource-policy": "cross-origin",
}


def image_type(content_type: str, data: bytes) -> str:
    """``content_type`` if it is an image type the gateway keeps and ``data``
    starts as such an image does; else a 422."""
    magic = MAGIC.get(content_type)
    if magic is None:
        raise ValidationFailed(
            f"an artifact is an image ({', '.join(MAGIC)}), not {content_type!r}",
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
    """Where artifacts are kept (``ARTIFACT_STORE``) and how links to them are signed."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.root = settings.artifact_path
        self.storage = settings.artifact_store or "local"
        self.ttl = settings.artifact_url_ttl
        self.public_url = settings.public_url
        self.signer = URLSafeTimedSerializer(settings.secret_keys(), salt="gateway.artifact")

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

    def link(self, row: dict[str, Any]) -> dict[str, Any]:
        """What the API says of an artifact: its ID, a fresh signed link, and what it is."""
        return {
            "artifact_id": row["id"],
            "url": self.url(row["id"]),
            "content_type": row["content_type"],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
            "width": row["width"],
            "height": row["height"],
            "run_id": row["run_id"],
        }

    async def store(
        self, run_id: str, content_type: str, data: bytes, width: int | None, height: int | None
    ) -> dict[str, Any]:
        """Keep ``data`` as an artifact of ``run_id``: an image of a type the
        gateway keeps (422 otherwise); its :meth:`link`."""
        content_type = image_type(content_type, data)
        project_id = await self.project_of_run(run_id)
        artifact_id = new_id("art")
        relative = Path(project_id) / f"{artifact_id}{_EXTENSIONS.get(content_type, '.bin')}"
        if self.storage == "local":
            path = self.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file.
            partial = path.with_suffix(path.suffix + ".partial")
            partial.write_bytes(data)
            os.replace(partial, path)
        row = {
            "id": artifact_id,
            "project_id": project_id,
            "run_id": run_id,
            "content_type": content_type,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": width,
            "height": height,
            "storage": self.storage,
            "path": str(relative),
            "created_at": utcnow(),
        }

        def insert(conn: sa.Connection) -> None:
            conn.execute(artifacts.insert(), row)
            if self.storage == "database":
                conn.execute(blobs.insert(), {"artifact_id": artifact_id, "data": data})

        await self.db.write(insert)
        return self.link(row)

    async def project_of_run(self, run_id: str) -> str:
        """The project of ``run_id`` (:class:`RunNotFound` if there is none)."""
        project_id = await self.db.read(
            lambda conn: conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
        )
        if project_id is None:
            raise RunNotFound(run_id)
        return str(project_id)

    def served_as(self, row: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """The content type and headers an artifact is served with: the image
        it is and nothing else (a file stored before uploads were checked is a
        download, never a page)."""
        if row["content_type"] in MAGIC:
            return row["content_type"], dict(SERVE_HEADERS)
        return "application/octet-stream", {**SERVE_HEADERS, "content-disposition": "attachment"}

    async def find(self, artifact_id: str, project_id: str | None = None) -> dict[str, Any]:
        """The artifact's row, if its bytes are there (404 otherwise)."""

        def select(conn: sa.Connection) -> dict[str, Any] | None:
            query = sa.select(artifacts).where(artifacts.c.id == artifact_id)
            if project_id is not None:
                query = query.where(artifacts.c.project_id == project_id)
            row = conn.execute(query).mappings().first()
            return dict(row) if row is not None else None

        row = await self.db.read(select)
        if row is None or (row["storage"] == "local" and not (self.root / row["path"]).is_file()):
            raise NotFound(f"no artifact with id {artifact_id!r}", code="artifact_not_found")
        return row

    async def response(
        self, row: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Response:
        """The artifact's bytes as an answer, from wherever they are kept."""
        content_type, served = self.served_as(row)
        served.update(headers or {})
        if row["storage"] == "local":
            return FileResponse(self.root / row["path"], media_type=content_type, headers=served)
        data = await self.db.read(
            lambda conn: conn.scalar(
                sa.select(blobs.c.data).where(blobs.c.artifact_id == row["id"])
            )
        )
        if data is None:
            raise NotFound(f"no artifact with id {row['id']!r}", code="artifact_not_found")
        return Response(bytes(data), media_type=content_type, headers=served)
