"""The ``llm`` task: Gemini through the google-genai SDK (async client)."""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.tasks.registry import TaskContext, TaskError, task

__all__ = ["LlmOutput", "LlmPayload", "llm"]


class LlmUsage(BaseModel):
    prompt_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None


class LlmOutput(BaseModel):
    """The model's answer."""

    text: str
    #: The model version that answered.
    model: str
    #: Why it stopped (``STOP``, ``MAX_TOKENS``, ``SAFETY``, …).
    finish_reason: str | None
    usage: LlmUsage


class LlmPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default="gemini-2.5-flash", min_length=1, max_length=200)
    system_prompt: str | None = None
    user_message: str = Field(min_length=1)
    images: list[str | dict[str, Any]] = Field(default_factory=list, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_output_tokens: int | None = Field(default=None, ge=1)


def _mime_of(data: bytes, declared: str | None) -> str:
    if declared and declared.startswith("image/"):
        return declared
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        raise TaskError("invalid_image", "an image for the model is not a readable image") from None


def _client(ctx: TaskContext) -> Any:
    from google import genai
    from google.genai import types

    settings = ctx.settings
    if not settings.gemini_api_key:
        raise TaskError(
            "llm_not_configured",
            "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) for the worker",
        )
    options = (
        types.HttpOptions(base_url=settings.gemini_base_url) if settings.gemini_base_url else None
    )
    return genai.Client(api_key=settings.gemini_api_key, http_options=options)


@task("llm", payload=LlmPayload, output=LlmOutput)
async def llm(payload: LlmPayload, ctx: TaskContext) -> dict[str, Any]:
    """Ask Gemini, with optional images; returns the text, finish reason and usage."""
    from google.genai import errors, types

    client = _client(ctx)
    parts = [types.Part.from_text(text=payload.user_message)]
    for ref in payload.images:
        image = await ctx.media.load(ref)
        parts.append(
            types.Part.from_bytes(
                data=image.data, mime_type=_mime_of(image.data, image.content_type)
            )
        )
    config = types.GenerateContentConfig(
        system_instruction=payload.system_prompt,
        temperature=payload.temperature,
        max_output_tokens=payload.max_output_tokens,
    )
    contents = [types.Content(role="user", parts=parts)]
    retries = ctx.settings.llm_max_retries
    for attempt in range(retries + 1):
        try:
            response = await client.aio.models.generate_content(
                model=payload.model, contents=contents, config=config
            )
            break
        except errors.APIError as exc:
            transient = exc.code == 429 or exc.code >= 500
            if not transient:
                raise TaskError(
                    "llm_request_rejected", f"Gemini answered {exc.code}: {exc.message}"
                ) from None
            if attempt == retries:
                code = "llm_rate_limited" if exc.code == 429 else "llm_unavailable"
                raise TaskError(
                    code,
                    f"Gemini answered {exc.code} {retries + 1} times: {exc.message}",
                    retryable=True,
                ) from None
            await asyncio.sleep(min(8.0, 0.25 * 2**attempt) * random.uniform(0.8, 1.2))
    candidate = response.candidates[0] if response.candidates else None
    finish = getattr(candidate, "finish_reason", None)
    usage = response.usage_metadata
    return {
        "text": response.text or "",
        "model": response.model_version or payload.model,
        "finish_reason": getattr(finish, "name", None) or (str(finish) if finish else None),
        "usage": {
            "prompt_tokens": getattr(usage, "prompt_token_count", None),
            "output_tokens": getattr(usage, "candidates_token_count", None),
            "total_tokens": getattr(usage, "total_token_count", None),
        },
    }
