"""mkdocs hook: the configuration reference, generated from the config model at build time.

docs/configuration.md holds the marker below; this hook replaces it with one table per
section of the config (flag, default, description), so the reference can never disagree
with `grpo run --help`, which is built from the same model. Only `config_settings()` knows
the model's shape: when the config changes shape, adapt that one function.
"""

from __future__ import annotations

import html
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, NamedTuple

from mkdocs.exceptions import PluginError

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"
# Section titles are source comments written for developers; a user reads no tracker numbers.
_TRACKER_REFERENCE = re.compile(r"\s*\(issue \d+\)", re.IGNORECASE)
_CODE_SPAN = re.compile(r"(`[^`]*`)")


class Setting(NamedTuple):
    flag: str  # the command-line spelling, e.g. `--group-size`
    default: Any  # the value used when neither a config file nor a flag gives one
    is_flag_pair: bool  # a bool: `--x` / `--no-x`
    allowed: list[str] | None  # the values a Literal field accepts
    description: str


def config_settings() -> list[tuple[str, list[Setting]]]:
    """Every setting of `grpo run`, grouped as `grpo run --help` groups them.

    Today the config is `flows.config.GRPOConfig`, a flat pydantic model, and
    `flows.config.field_sections()` groups its field names under the section comments of
    its source. A field `group_size` is the flag `--group-size` and the config-file key
    `group_size`."""
    from flows.config import GRPOConfig, field_sections

    fields = GRPOConfig.model_fields
    return [
        (
            title,
            [
                Setting(
                    flag="--" + name.replace("_", "-"),
                    default=fields[name].get_default(call_default_factory=True),
                    is_flag_pair=fields[name].annotation is bool,
                    allowed=_literal_values(fields[name].annotation),
                    description=fields[name].description or "",
                )
                for name in names
            ],
        )
        for title, names in field_sections()
    ]


def _literal_values(annotation) -> list[str] | None:
    """The values of a Literal type, also inside `Literal[...] | None`."""
    for arm in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arm) is typing.Literal:
            return [str(v) for v in typing.get_args(arm)]
    return None


def _markdown_text(text: str) -> str:
    """Plain description text as one table cell: `<placeholders>` shown rather than taken as
    HTML, `*` and `|` literal; code spans left as they are (Markdown keeps them literal)."""
    parts = _CODE_SPAN.split(" ".join(text.split()))
    return "".join(
        part if part.startswith("`") else html.escape(part, quote=False).replace("*", r"\*").replace("|", r"\|")
        for part in parts
    )


def _default_cell(value: Any) -> str:
    if value is None:
        return "unset"
    shown = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
    return f"`{shown}`"


def _flag_cell(setting: Setting) -> str:
    if setting.is_flag_pair:
        return f"`{setting.flag}` / `--no-{setting.flag[2:]}`"
    return f"`{setting.flag}`"


def render_reference(sections: list[tuple[str, list[Setting]]]) -> str:
    blocks = []
    for title, settings in sections:
        rows = ["| flag | default | description |", "|---|---|---|"]
        for setting in settings:
            description = _markdown_text(setting.description)
            if setting.allowed:
                description += " One of: " + ", ".join(f"`{value}`" for value in setting.allowed) + "."
            rows.append(f"| {_flag_cell(setting)} | {_default_cell(setting.default)} | {description} |")
        heading = _TRACKER_REFERENCE.sub("", title)
        blocks.append(f"### {heading[:1].upper()}{heading[1:]}\n\n" + "\n".join(rows))
    # The class lets docs/stylesheets/extra.css keep each flag on one line.
    return '<div class="config-reference" markdown>\n\n' + "\n\n".join(blocks) + "\n\n</div>"


def on_config(config, **kwargs):
    # The reference describes the checkout being built, not whichever copy of grpoflow the
    # environment happens to have installed (an editable install may point elsewhere).
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE}: the marker {MARKER} is missing, so the reference has nowhere to go")
    try:
        sections = config_settings()
    except ImportError as err:
        raise PluginError(f"docs/{PAGE}: cannot import the config model ({err}); install grpoflow first") from err
    return markdown.replace(MARKER, render_reference(sections)).replace(TRL_MARKER, render_trl_names())


TRL_MARKER = "<!-- trl-names -->"


def render_trl_names() -> str:
    """TRL's flag names that `grpo run` accepts, and those it answers with what to use instead
    (flows.cli.TRL_FLAGS and TRL_INSTEAD: the CLI's own tables)."""
    from flows.cli import TRL_FLAGS, TRL_INSTEAD

    rows = ["| TRL flag | here |", "|---|---|"]
    rows += [f"| `{flag}` | `--{field.replace('_', '-')}` (accepted as it is) |" for flag, field in TRL_FLAGS.items()]
    rows += [f"| `{flag}` | {advice} |" for flag, advice in TRL_INSTEAD.items()]
    return "\n".join(rows)
