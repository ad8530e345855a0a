"""MkDocs hook: the configuration reference, generated from the config dataclasses and their docstrings.

The line ``<!-- pfedlora:configuration-reference -->`` of a page becomes one table per section of
:class:`pfedlora.config.ExperimentConfig` and one per algorithm's options: every key with its default, what
it allows (as validation checks it) and the field's docstring, so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from functools import cache
from typing import Any

import griffe

PLACEHOLDER = "<!-- pfedlora:configuration-reference -->"


@cache
def _module(path: str) -> griffe.Module:
    return griffe.load(path, resolve_aliases=False)


def _docstring(cls: type, name: str) -> str:
    """The attribute docstring of field ``name``, from the class of ``cls``'s MRO that declares it."""
    for owner in cls.__mro__:
        if name in inspect.get_annotations(owner):
            member = _module(owner.__module__)[owner.__qualname__].members.get(name)
            if member is not None and member.docstring is not None:
                return " ".join(member.docstring.value.split())
            return ""
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`".replace("'", '"')


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    lines += [
        f"| `{key}` | {_cell(default)} | {_cell(allowed)} | {_cell(doc)} |"
        for key, default, allowed, doc in rows
    ]
    return "\n".join(lines)


def reference_markdown() -> str:
    """Every section's table, then every algorithm's options table."""
    from pfedlora.config import (
        ExperimentConfig,
        allowed_values,
        default_options,
        key_allowed_values,
        option_key,
    )

    config = ExperimentConfig()
    hints = typing.get_type_hints(ExperimentConfig)
    top: list[tuple[str, str, str, str]] = []
    sections: list[str] = []
    for declared in dataclasses.fields(ExperimentConfig):
        value = getattr(config, declared.name)
        if declared.name == "options":
            continue
        if dataclasses.is_dataclass(value):
            cls = hints[declared.name]
            rows = [
                (
                    f"{declared.name}.{f.name}",
                    _default(getattr(value, f.name)),
                    key_allowed_values(f"{declared.name}.{f.name}"),
                    _docstring(cls, f.name),
                )
                for f in dataclasses.fields(value)
            ]
            summary = " ".join((cls.__doc__ or "").split())
            sections.append(f"### `[{declared.name}]`\n\n{summary}\n\n{_table(rows)}")
        else:
            top.append(
                (
                    declared.name,
                    _default(value),
                    key_allowed_values(declared.name),
                    _docstring(ExperimentConfig, declared.name),
                )
            )
    parts = [f"### Top level\n\n{_table(top)}", *sections, "## Each algorithm's options"]
    for name, options in default_options().items():
        cls = type(options)
        rows = [
            (
                f"{name}.{option_key(f.name)}",
                _default(getattr(options, f.name)),
                allowed_values(f),
                _docstring(cls, f.name),
            )
            for f in dataclasses.fields(options)
        ]
        summary = " ".join((cls.__doc__ or "").split())
        parts.append(f"### `[{name}]`\n\n{summary}\n\n{_table(rows)}")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs' page hook: the placeholder replaced by the generated tables."""
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, reference_markdown())
