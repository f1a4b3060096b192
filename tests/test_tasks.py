"""crop-image and llm over real processes, with real images and the Gemini stand-in."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from PIL import Image

from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from gateway.settings import Settings
from jobs.tasks.registry import TaskContext, TaskError
from tests.conftest import TEST_SECRET, Databases, Stack, _redis_db, launch_stack
from tests.gemini import GeminiStandIn
from tests.helpers import ROOT, Process, wait_http_ok
from tests.receiver import Receiver

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def quadrants(width: int = 200, height: int = 100, fmt: str = "PNG") -> bytes:
    """An image whose four quadrants are red, blue / green, white."""
    image = Image.new("RGB", (width, height), WHITE)
    half_w, half_h = width // 2, height // 2
    for box, color in (
        ((0, 0, half_w, half_h), RED),
        ((half_w, 0, width, half_h), BLUE),
        ((0, half_h, half_w, height), GREEN),
    ):
        image.paste(color, box)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def download(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)


def colors(data: bytes) -> set[tuple[int, int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        return {
            rgb.getpixel((x, y))
            for x in range(0, rgb.width, 5)  # type: ignore[misc]
            for y in range(0, rgb.height, 5)
        }


def test_crop_by_percent_from_a_data_uri_stores_a_signed_artifact(stack: Stack) -> None:
    run = stack.run(
        "crop-image",
        {
            "image": data_uri(quadrants()),
            "x_percent": 0,
            "y_percent": 0,
            "width_percent": 50,
            "height_percent": 50,
        },
    )
    assert run["status"] == "COMPLETED", run["error"]
    out = run["output"]
    assert (out["width"], out["height"], out["format"]) == (100, 50, "png")
    assert out["artifact_id"].startswith("art_")
    got = download(out["url"])
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/png"
    assert len(got.content) == out["bytes"]
    assert hashlib.sha256(got.content).hexdigest() == out["sha256"]
    assert colors(got.content) == {RED}

    with stack.client() as client:
        link = client.get(f"/api/v1/artifacts/{out['artifact_id']}/link")
        assert link.status_code == 200
        assert download(link.json()["url"]).content == got.content
    with stack.client(stack.new_key("artifact-stranger")) as stranger:
        assert stranger.get(f"/api/v1/artifacts/{out['artifact_id']}/link").status_code == 404


def test_a_tampered_link_is_403_and_an_expired_one_410(stack: Stack) -> None:
    run = stack.run(
        "crop-image", {"image": data_uri(quadrants()), "x": 0, "y": 0, "width": 10, "height": 10}
    )
    url = run["output"]["url"]
    token = url.rsplit("/", 1)[1]
    tampered = download(url[: -len(token)] + token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    assert tampered.status_code == 403
    assert tampered.json()["error"]["code"] == "invalid_token"

    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 30 * 24 * 3600

    old = URLSafeTimedSerializer(TEST_SECRET, salt="gateway.artifact", signer=Past)
    expired = download(
        f"{stack.base_url}/api/v1/artifacts/{old.dumps(run['output']['artifact_id'])}"
    )
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "link_expired"


def test_crop_by_pixels_from_a_url_to_jpeg(stack: Stack, receiver: Receiver) -> None:
    receiver.files["/img/quad.png"] = (quadrants(), "image/png")
    run = stack.run(
        "crop-image",
        {
            "image_url": receiver.url("/img/quad.png"),
            "x": 100,
            "y": 0,
            "width": 100,
            "height": 50,
            "format": "jpeg",
            "quality": 90,
        },
    )
    assert run["status"] == "COMPLETED", run["error"]
    out = run["output"]
    assert (out["width"], out["height"], out["format"]) == (100, 50, "jpeg")
    got = download(out["url"])
    assert got.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(got.content)) as image:
        r, g, b = image.convert("RGB").getpixel((50, 25))  # type: ignore[misc]
    assert b > 200 and r < 60 and g < 60  # blue, give or take JPEG


def test_exif_orientation_is_honoured_before_cropping(stack: Stack) -> None:
    # Stored 200x100 with red on the left, blue on the right; EXIF orientation 6
    # says "turn 90 degrees clockwise to view", so the viewer sees 100x200 with
    # red on top. The top half of what the viewer sees is all red.
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(RED, (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    run = stack.run(
        "crop-image",
        {
            "image_base64": base64.b64encode(out.getvalue()).decode(),
            "x_percent": 0,
            "y_percent": 0,
            "width_percent": 100,
            "height_percent": 50,
            "format": "png",
        },
    )
    assert run["status"] == "COMPLETED", run["error"]
    assert (run["output"]["width"], run["output"]["height"]) == (100, 100)
    seen = colors(download(run["output"]["url"]).content)
    assert all(r > 200 and g < 60 and b < 60 for r, g, b in seen), seen


BAD_CROPS = [
    pytest.param({"image": data_uri(quadrants()[:200])}, "invalid_image", id="truncated"),
    pytest.param(
        {"image": data_uri(b"this is not an image at all")}, "invalid_image", id="not-an-image"
    ),
    pytest.param({"image": "data:image/png;base64,@@@"}, "invalid_image", id="bad-base64"),
    pytest.param(
        {"image": data_uri(quadrants()), "x": 150, "y": 0, "width": 100, "height": 10},
        "invalid_crop_box",
        id="box-outside",
    ),
    pytest.param(
        {
            "image": data_uri(quadrants()),
            "x_percent": 10,
            "y_percent": 10,
            "width_percent": 0,
            "height_percent": 50,
        },
        "invalid_crop_box",
        id="zero-area",
    ),
    pytest.param(
        {"image": data_uri(quadrants(3000, 2000))}, "image_too_large", id="decompression-bomb"
    ),
    pytest.param(
        {"image_url": "http://10.0.0.1/cat.png"}, "image_url_not_allowed", id="private-address"
    ),
]


@pytest.mark.parametrize(("source", "code"), BAD_CROPS)
def test_bad_images_and_boxes_fail_the_run_with_a_clear_code(
    stack: Stack, source: dict[str, Any], code: str
) -> None:
    payload = {"x_percent": 0, "y_percent": 0, "width_percent": 50, "height_percent": 50}
    if any(k in source for k in ("x", "x_percent")):
        payload = {}
    run = stack.run("crop-image", {**payload, **source})
    assert run["status"] == "FAILED"
    assert run["error"]["code"] == code, run["error"]
    assert len(run["attempts"]) == 1
    assert stack.worker.alive


def test_an_oversized_download_is_refused(stack: Stack, receiver: Receiver) -> None:
    receiver.files["/img/huge.png"] = (b"\x89PNG" + b"0" * 2_100_000, "image/png")
    run = stack.run(
        "crop-image",
        {"image_url": receiver.url("/img/huge.png"), "x": 0, "y": 0, "width": 1, "height": 1},
    )
    assert run["status"] == "FAILED"
    assert run["error"]["code"] == "image_too_large"


def test_a_crop_payload_without_a_box_is_a_422(stack: Stack) -> None:
    with stack.client() as client:
        answer = client.post(
            "/api/v1/tasks/crop-image/trigger",
            json={"payload": {"image": "data:image/png;base64,AAAA", "x_percent": 5}},
        )
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_payload"


# -- llm -------------------------------------------------------------------------


def unique(name: str) -> str:
    """A marker no other test (nor the other database's run) puts in a prompt."""
    return f"{name}-{secrets.token_hex(4)}"


def test_llm_sends_prompt_system_instruction_and_image_bytes(
    stack: Stack, gemini: GeminiStandIn
) -> None:
    marker = unique("marker-llm")
    image = quadrants(40, 20)
    run = stack.run(
        "llm",
        {
            "system_prompt": "You describe images.",
            "user_message": f"{marker} what colours?",
            "images": [data_uri(image)],
            "temperature": 0.3,
            "max_output_tokens": 99,
        },
    )
    assert run["status"] == "COMPLETED", run["error"]
    [sent] = gemini.requests_with(marker)
    assert sent.model == "gemini-2.5-flash"
    assert sent.api_key == "stand-in-key"
    assert sent.system_text == "You describe images."
    assert sent.images == [("image/png", image)]
    assert sent.body["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 99}
    assert run["output"] == {
        "text": f"seen: {marker} what colours? (1 image(s))",
        "model": "gemini-2.5-flash",
        "finish_reason": "STOP",
        "usage": {"prompt_tokens": 11, "output_tokens": 5, "total_tokens": 16},
    }


def test_llm_retries_503_and_fails_clearly_on_400_and_lasting_429(
    stack: Stack, gemini: GeminiStandIn
) -> None:
    m503, m400, m429 = unique("marker-503"), unique("marker-400"), unique("marker-429")
    gemini.fail(m503, 503, 503)
    ok = stack.run("llm", {"user_message": f"{m503} hello", "model": "gemini-x"})
    assert ok["status"] == "COMPLETED"
    assert len(gemini.requests_with(m503)) == 3
    assert ok["output"]["model"] == "gemini-x"

    gemini.fail(m400, 400)
    rejected = stack.run("llm", {"user_message": f"{m400} hello"})
    assert rejected["status"] == "FAILED"
    assert rejected["error"]["code"] == "llm_request_rejected"
    assert "API key not valid" in rejected["error"]["message"]
    assert len(gemini.requests_with(m400)) == 1  # a 4xx is not retried

    gemini.fail(m429, 429, 429, 429, 429)
    # One attempt only: a lasting 429 is retryable, and a second attempt of the
    # run would try the provider again.
    limited = stack.run("llm", {"user_message": f"{m429} hello"}, max_attempts=1)
    assert limited["status"] == "FAILED"
    assert limited["error"]["code"] == "llm_rate_limited"
    assert len(gemini.requests_with(m429)) == 3  # LLM_MAX_RETRIES=2 in the tests


def test_llm_without_a_key_says_which_variable_to_set() -> None:
    import asyncio

    from jobs.tasks.llm import LlmPayload, llm

    ctx = TaskContext(
        run_id="run_x",
        task="llm",
        attempt=1,
        worker_id="t",
        logger=logging.LoggerAdapter(logging.getLogger("t")),
        settings=Settings.from_env({}),
        media=None,
    )  # type: ignore[arg-type]
    with pytest.raises(TaskError) as info:
        asyncio.run(llm(LlmPayload(user_message="hi"), ctx))
    assert info.value.code == "llm_not_configured"
    assert "GEMINI_API_KEY" in info.value.message


def test_the_gemini_stand_in_runs_on_its_own_for_trying_the_llm_task() -> None:
    """``python -m tests.gemini``, as the README says, answers the real SDK."""
    from google import genai
    from google.genai import types

    process = subprocess.Popen(
        [sys.executable, "-m", "tests.gemini"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+):", first)
        assert found, first
        said = process.stdout.readline() + process.stdout.readline()
        assert f"GEMINI_BASE_URL={found.group(1)}" in said
        client = genai.Client(
            api_key="stand-in", http_options=types.HttpOptions(base_url=found.group(1))
        )
        answer = client.models.generate_content(model="gemini-2.0-flash", contents="hello there")
        assert answer.text is not None and answer.text.startswith("seen: hello there")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        if process.stdout is not None:
            process.stdout.close()


def test_any_gateway_serves_any_artifact_from_the_shared_store(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ARTIFACT_STORE=database: a crop stored through one gateway host is
    served by another, which has none of the first one's disk."""
    logs = tmp_path_factory.mktemp("logs-artifacts")
    with launch_stack(
        "artifacts",
        databases.new("artifacts"),
        f"{redis_server.url}/{_redis_db(database_url, 8)}",
        logs,
        ARTIFACT_STORE="database",
    ) as stack:
        port = free_port()
        other = Process(
            "gateway-b",
            ["-m", "gateway", "web"],
            {
                **stack.env,
                "PORT": str(port),
                "GATEWAY_URL": f"http://127.0.0.1:{port}",
                "ARTIFACT_DIR": str(logs / "b-artifacts"),
            },
            logs,
        ).start()
        try:
            other_url = f"http://127.0.0.1:{port}"
            wait_http_ok(other_url + "/healthz", other)
            run = stack.run(
                "crop-image",
                {"image": data_uri(quadrants()), "x": 100, "y": 0, "width": 100, "height": 50},
            )
            assert run["status"] == "COMPLETED", run["error"]
            out = run["output"]
            assert not (logs / "artifacts").exists()  # nothing on the first host's disk
            through_b = download(out["url"].replace(stack.base_url, other_url))
            assert through_b.status_code == 200, through_b.text
            assert through_b.headers["content-type"] == "image/png"
            assert hashlib.sha256(through_b.content).hexdigest() == out["sha256"]
            assert colors(through_b.content) == {BLUE}
            headers = {"authorization": f"Bearer {stack.api_key}"}
            link = httpx.get(
                f"{other_url}/api/v1/artifacts/{out['artifact_id']}/link", headers=headers
            )
            assert link.status_code == 200 and link.json()["width"] == 100
            assert download(link.json()["url"]).content == through_b.content
        finally:
            other.stop()
