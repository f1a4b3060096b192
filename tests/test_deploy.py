"""The deployment files (Procfile, Dockerfile, compose.yaml, deploy/Caddyfile)
checked as far as this machine can check them: no container runtime runs here,
so no image is built. Every command they run must be one the ``gateway``
command takes, every variable they set a setting, the image's Python one the
project supports, and the package they install must hold what it needs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from gateway.cli import build_parser
from gateway.settings import Settings
from tests.helpers import ROOT

#: Variables the files set that are not the gateway's settings.
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR"}


def setting_names() -> set[str]:
    names = {Settings.env_name(field) for field in Settings.model_fields}
    # Second names some settings answer to.
    return names | {"GOOGLE_API_KEY", "PROMETHEUS_MULTIPROC_DIR"}


def takes(command: list[str]) -> None:
    """Fail unless ``gateway`` parses ``command`` (``["gateway", ...]``)."""
    assert command[0] == "gateway", command
    try:
        build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"the gateway command does not take {shlex.join(command)!r}")


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def our_services() -> dict[str, dict[str, Any]]:
    """The compose services that run our image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("build") == "." or service.get("image") == "webhook-job-gateway"
    }


def test_the_procfile_runs_gateway_commands_and_web_listens_for_a_platform() -> None:
    processes = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    # Callbacks leave from a dispatcher by default: the Procfile runs one.
    assert set(processes) == {"release", "web", "worker", "dispatch"}
    for command in processes.values():
        takes(shlex.split(command))
    web = build_parser().parse_args(shlex.split(processes["web"])[1:])
    # A platform routes to the container's interface, not its loopback; and
    # the port is the PORT it sets, which `gateway web` reads.
    assert web.host == "0.0.0.0" and web.port is None
    assert processes["release"].strip() == "gateway migrate"


def test_the_image_is_small_non_root_and_on_a_supported_python() -> None:
    instructions = dockerfile()
    images = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    supported = SpecifierSet(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    )
    for image in images:
        found = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim", image)
        assert found, f"{image}: a python slim image"
        assert found.group(1) + ".0" in supported, f"{image} against {supported}"
    assert len(set(images)) == 1, "the build and the image on one Python"

    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a user of its own"
    for word, rest in instructions:
        if word == "CMD":
            takes(yaml.safe_load(rest))
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        if word == "ENV":
            names = {m.group(1) for m in re.finditer(r"(\w+)=", rest)}
            assert names - NOT_SETTINGS <= setting_names(), names - setting_names()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored and ".git" in ignored


def test_compose_runs_gateway_commands_with_settings_only() -> None:
    services = our_services()
    assert {"migrate", "gateway-1", "gateway-2", "worker", "dispatch"} <= set(services)
    names = setting_names()
    for name, service in services.items():
        takes(service["command"])
        unknown = set(service.get("environment", {})) - names - NOT_SETTINGS
        assert not unknown, f"{name} sets {unknown}, which are no settings"
    assert services["migrate"]["command"] == ["gateway", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for web in ("gateway-1", "gateway-2"):
        after = services[web]["depends_on"]["migrate"]["condition"]
        assert after == "service_completed_successfully"
        probe = " ".join(services[web]["healthcheck"]["test"])
        assert "/readyz" in probe
    assert services["worker"]["deploy"]["replicas"] >= 2
    # Callbacks leave from dispatchers (the setting's default), side by side.
    assert services["dispatch"]["command"] == ["gateway", "dispatch"]
    assert services["dispatch"]["deploy"]["replicas"] >= 2
    assert "WEBHOOK_DISPATCHER" not in services["dispatch"]["environment"]
    env = services["gateway-1"]["environment"]
    # Several gateway hosts: artifacts in the database every one of them reads.
    assert env["ARTIFACT_STORE"] == "database"
    assert env["DATABASE_URL"].startswith("postgresql://")


def test_the_proxy_sends_to_every_gateway_and_checks_readiness() -> None:
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    upstreams = re.search(r"reverse_proxy ([^{]+)\{", caddyfile)
    assert upstreams
    named = {u.split(":")[0] for u in upstreams.group(1).split()}
    webs = {n for n, s in our_services().items() if s["command"] == ["gateway", "web"]}
    assert named == webs
    assert "health_uri /readyz" in caddyfile
    proxy = compose()["services"]["proxy"]
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    # Workers report through it.
    assert our_services()["worker"]["environment"]["GATEWAY_URL"] == "http://proxy"


def test_the_package_holds_its_migrations_templates_and_static_files(tmp_path: Path) -> None:
    """What the image installs is the package, not the checkout: it must carry
    the files that are not Python modules."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        str(p.relative_to(ROOT))
        for pattern in (
            "db/migrations/versions/*.py",
            "db/migrations/*.py",
            "db/migrations/*.mako",
            "gateway/dashboard/templates/*.html",
            "gateway/dashboard/static/*",
        )
        for p in ROOT.glob(pattern)
    ]
    missing = [n for n in needed if n not in names]
    assert needed and not missing, missing
    assert not [n for n in names if n.startswith("tests/")]


def test_compose_keeps_no_password_and_links_follow_the_site_address() -> None:
    from gateway.settings import Settings

    text = (ROOT / "compose.yaml").read_text()
    services = compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    assert "${POSTGRES_PASSWORD:?" in our_services()["migrate"]["environment"]["DATABASE_URL"]
    assert "gateway:gateway@" not in text
    base = {"GATEWAY_SECRET_KEY": "x" * 32, "GATEWAY_URL": "http://proxy"}
    for site, public in (
        ("jobs.example.com", "https://jobs.example.com"),
        ("localhost", "http://localhost"),
        (":80", "http://proxy"),
    ):
        assert Settings.from_env({**base, "SITE_ADDRESS": site}).public_url == public
    explicit = {**base, "SITE_ADDRESS": "jobs.example.com", "PUBLIC_URL": "https://x.example"}
    assert Settings.from_env(explicit).public_url == "https://x.example"
