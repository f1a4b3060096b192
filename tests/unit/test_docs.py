"""The documentation made from the code (docs/hooks.py) and the README's links."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_has_a_description_and_a_row_on_the_configuration_page() -> None:
    table = hooks().settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 20, name
        assert f"| `{Settings.env_name(name)}`" in table, name


def test_the_api_reference_has_every_operation_and_every_schema() -> None:
    from gateway.api.openapi import build_document
    from gateway.app import create_app

    page = hooks().openapi_reference()
    app = create_app(Settings(secret_key="x" * 20, redis_url="redis://127.0.0.1:1"))
    document = build_document(app.routes)
    for path, methods in document["paths"].items():
        for method in methods:
            assert f"### `{method.upper()} {path}`" in page
    for name in document["components"]["schemas"]:
        assert f"{{#schema-{name.lower()}}}" in page
    linked = set(re.findall(r"\(#(schema-[a-z0-9_]+)\)", page))
    assert linked <= {f"schema-{n.lower()}" for n in document["components"]["schemas"]}


def test_the_readme_is_short_and_its_links_lead_to_files() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), target
