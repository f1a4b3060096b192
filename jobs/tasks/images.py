"""The ``crop-image`` task (Pillow)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.tasks.registry import TaskContext, TaskError, task

__all__ = ["CropPayload", "crop_bytes", "crop_image"]

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
Percent = Field(default=None, ge=0, le=100)


class CropOutput(BaseModel):
    """The cropped image, kept as an artifact."""

    artifact_id: str
    #: A signed link to it (``ARTIFACT_URL_TTL``; ``GET /api/v1/artifacts/{id}/link``
    #: gives a fresh one).
    url: str
    width: int
    height: int
    format: str
    content_type: str
    bytes: int
    sha256: str


class CropPayload(BaseModel):
    """Where the image comes from (one of four ways) and the box to keep."""

    model_config = ConfigDict(extra="forbid")

    image: str | dict[str, Any] | None = Field(
        default=None, description="a URL, a data URI, or an upstream artifact"
    )
    image_url: str | None = None
    image_base64: str | None = None
    artifact_id: str | None = None
    x_percent: float | None = Percent
    y_percent: float | None = Percent
    width_percent: float | None = Percent
    height_percent: float | None = Percent
    x: int | None = Field(default=None, ge=0)
    y: int | None = Field(default=None, ge=0)
    width: int | None = Field(default=None, ge=0)
    height: int | None = Field(default=None, ge=0)
    format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    quality: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _one_box(self) -> CropPayload:
        percent = [self.x_percent, self.y_percent, self.width_percent, self.height_percent]
        pixels = [self.x, self.y, self.width, self.height]
        has_percent = any(v is not None for v in percent)
        has_pixels = any(v is not None for v in pixels)
        if has_percent and has_pixels:
            raise ValueError("give the box in percent or in pixels, not both")
        if has_percent and any(v is None for v in percent):
            raise ValueError(
                "a box in percent needs x_percent, y_percent, width_percent and height_percent"
            )
        if has_pixels and any(v is None for v in pixels):
            raise ValueError("a box in pixels needs x, y, width and height")
        if not has_percent and not has_pixels:
            raise ValueError("a crop needs a box (in percent or in pixels)")
        return self

    def image_ref(self) -> Any:
        given = [v for v in (self.image, self.image_url, self.image_base64) if v is not None]
        if self.artifact_id is not None:
            given.append({"artifact_id": self.artifact_id})
        if len(given) != 1:
            raise TaskError(
                "invalid_input", "give exactly one of image, image_url, image_base64 or artifact_id"
            )
        return given[0]


def _box(payload: CropPayload, width: int, height: int) -> tuple[int, int, int, int]:
    if payload.x_percent is not None:
        assert payload.y_percent is not None and payload.width_percent is not None
        assert payload.height_percent is not None
        left = round(width * payload.x_percent / 100)
        top = round(height * payload.y_percent / 100)
        right = round(width * (payload.x_percent + payload.width_percent) / 100)
        bottom = round(height * (payload.y_percent + payload.height_percent) / 100)
        # Rounding may push a full-width box one pixel out: clamp percent boxes.
        right, bottom = min(right, width), min(bottom, height)
        if payload.x_percent + payload.width_percent > 100.0001 or (
            payload.y_percent + payload.height_percent > 100.0001
        ):
            raise TaskError("invalid_crop_box", "the box reaches past the image (over 100 %)")
    else:
        assert payload.x is not None and payload.y is not None
        assert payload.width is not None and payload.height is not None
        left, top = payload.x, payload.y
        right, bottom = payload.x + payload.width, payload.y + payload.height
        if right > width or bottom > height:
            raise TaskError(
                "invalid_crop_box",
                f"the box ({left},{top})-({right},{bottom}) reaches past the "
                f"{width}x{height} image",
            )
    if right - left <= 0 or bottom - top <= 0:
        raise TaskError("invalid_crop_box", "the box has no area")
    return left, top, right, bottom


def crop_bytes(
    data: bytes, payload: CropPayload, *, max_pixels: int
) -> tuple[bytes, str, int, int]:
    """Crop an encoded image; returns ``(encoded, pillow_format, width, height)``.

    EXIF orientation is applied first, so the box is in the image as seen.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            source_format = image.format or "PNG"
            if image.width * image.height > max_pixels:
                raise TaskError(
                    "image_too_large",
                    f"{image.width}x{image.height} is over IMAGE_MAX_PIXELS ({max_pixels})",
                )
            image.load()
    except TaskError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TaskError("image_too_large", "the image has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TaskError("invalid_image", f"cannot read the image: {exc}") from None
    image = ImageOps.exif_transpose(image)
    left, top, right, bottom = _box(payload, image.width, image.height)
    cropped = image.crop((left, top, right, bottom))
    target = _FORMATS[payload.format] if payload.format else source_format
    if target not in _CONTENT_TYPES:
        target = "PNG"
    if target == "JPEG" and cropped.mode not in ("RGB", "L"):
        cropped = cropped.convert("RGB")
    out = io.BytesIO()
    options: dict[str, Any] = {}
    if payload.quality is not None and target in ("JPEG", "WEBP"):
        options["quality"] = payload.quality
    cropped.save(out, format=target, **options)
    return out.getvalue(), target, cropped.width, cropped.height


@task("crop-image", payload=CropPayload, output=CropOutput)
async def crop_image(payload: CropPayload, ctx: TaskContext) -> dict[str, Any]:
    """Crop an image (a box in percent or pixels) and store it as an artifact."""
    media = ctx.media
    source = await media.load(payload.image_ref())
    # Decoding and encoding are CPU work (seconds for a large image): in a
    # thread, so the worker's other runs and heartbeats go on meanwhile.
    encoded, target, width, height = await asyncio.to_thread(
        crop_bytes, source.data, payload, max_pixels=ctx.settings.image_max_pixels
    )
    content_type = _CONTENT_TYPES[target]
    stored = await media.store(encoded, content_type, width=width, height=height)
    return {
        "artifact_id": stored["artifact_id"],
        "url": stored["url"],
        "width": width,
        "height": height,
        "format": target.lower(),
        "content_type": content_type,
        "bytes": len(encoded),
        "sha256": hashlib.sha256(encoded).hexdigest(),
    }
