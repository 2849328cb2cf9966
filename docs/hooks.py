"""MkDocs hooks: pages whose content tunesmith generates, so that they cannot drift from the
code. `config-reference.md` gets every run-config field from the schema itself (the same
source as `tunesmith config schema`)."""

from __future__ import annotations

MARKER = "<!-- generated: config fields -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        from tunesmith.config.docs import schema_markdown

        markdown = markdown.replace(MARKER, schema_markdown())
    return markdown
