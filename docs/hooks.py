"""mkdocs hooks: the pages made from the code, so they cannot drift from it.

- ``configuration.md``: ``<!-- settings -->`` becomes a table of every setting,
  made from the fields of ``gateway.settings.Settings`` (their docstrings are
  their descriptions, their defaults the code's own).
- ``reference/api.md``: ``<!-- openapi -->`` becomes the reference of every
  operation and schema, made from the same document ``GET /openapi.json``
  serves (``gateway.api.openapi.build_document`` over the app's routes).

``make docs`` builds the site with ``mkdocs build --strict``; CI runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _rst(text: str) -> str:
    """The field docstrings' reStructuredText literals as Markdown's."""
    return text.replace("``", "`")


def _default(name: str, field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value in ("", None, ()):
        return "unset"
    if isinstance(value, tuple):
        return "`" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def settings_table() -> str:
    """Every setting: its variable, its default and its description."""
    from gateway.settings import Settings

    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in sorted(Settings.model_fields.items(), key=lambda f: Settings.env_name(f[0])):
        variable = Settings.env_name(name)
        others = []
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            others = [str(c) for c in choices[1:]]
        shown = " or ".join(f"`{v}`" for v in [variable, *others])
        if not field.description:
            raise ValueError(f"the setting {variable} has no docstring")
        rows.append(f"| {shown} | {_default(name, field)} | {_cell(_rst(field.description))} |")
    return "\n".join(rows)


def _type(schema: dict[str, Any]) -> str:
    """A schema's type in a few words, with links to named schemas."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "oneOf" in schema:
        return " or ".join(_type(s) for s in schema["oneOf"])
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return f"object of {_type(extra)}" if isinstance(extra, dict) else "object"
    if isinstance(kind, list):
        return " or ".join(kind)
    return kind or "any"


def _schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if schema.get("description"):
        lines += [_rst(schema["description"]).strip(), ""]
    properties = schema.get("properties")
    if properties:
        required = set(schema.get("required", ()))
        lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
        for field, spec in properties.items():
            lines.append(
                f"| `{field}` | {_cell(_type(spec))} | {'yes' if field in required else ''} "
                f"| {_cell(_rst(spec.get('description', '')))} |"
            )
        lines.append("")
    elif "enum" in schema or "type" in schema:
        lines += [f"{_type(schema)}", ""]
    return lines


def openapi_reference() -> str:
    """Every operation, grouped by tag, then every schema."""
    from gateway.api.openapi import build_document
    from gateway.app import create_app
    from gateway.settings import Settings

    # The routes only: no database or Redis is reached while the app is built.
    app = create_app(Settings(secret_key="docs" * 8, redis_url="redis://127.0.0.1:1"))
    document = build_document(app.routes)
    schemes = document["components"]["securitySchemes"]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            by_tag.setdefault(op["tags"][0], []).append((method.upper(), path, op))
    lines: list[str] = []
    for tag in sorted(by_tag):
        lines += [f"## {tag}", ""]
        for method, path, op in by_tag[tag]:
            lines += [f"### `{method} {path}`", "", f"{op['summary']}.", ""]
            auth = [schemes[name]["description"] for s in op["security"] for name in s]
            lines += [f"**Auth**: {' or '.join(auth) if auth else 'none'}.", ""]
            if op["parameters"]:
                lines += [
                    "| parameter | in | required | description |",
                    "| --- | --- | --- | --- |",
                ]
                for p in op["parameters"]:
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {'yes' if p['required'] else ''} "
                        f"| {_cell(p.get('description') or '')} |"
                    )
                lines.append("")
            body = op.get("requestBody")
            if body:
                lines += [
                    f"**Body**: {_type(body['content']['application/json']['schema'])}.",
                    "",
                ]
            lines += ["| answer | body |", "| --- | --- |"]
            for code, answer in op["responses"].items():
                content = answer.get("content", {}).get("application/json")
                shown = _type(content["schema"]) if content else ""
                lines.append(f"| {code} {_cell(answer['description'])} | {shown} |")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in sorted(document["components"]["schemas"].items()):
        lines += _schema_section(name, schema)
    return "\n".join(lines)


_MARKERS = {
    "configuration.md": ("<!-- settings -->", settings_table),
    "reference/api.md": ("<!-- openapi -->", openapi_reference),
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill a page's marker with what the code says."""
    found = _MARKERS.get(page.file.src_uri)
    if found is None:
        return markdown
    marker, make = found
    if marker not in markdown:
        raise ValueError(f"{page.file.src_uri} lost its {marker} marker")
    return markdown.replace(marker, make())
