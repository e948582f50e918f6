"""Write the reference pages of the documentation from the code: settings, CLI and summary schema.

Run by ``make docs`` (and so by ``make test``) before ``mkdocs build --strict``;
the pages are never edited by hand, so they cannot drift from the code.

Usage: python docs/gen_reference.py [--out docs/reference]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _bounds(info: Any) -> str:
    out = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min length")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def configuration() -> str:
    """Every run setting, section by section: its environment variables, type, default, bounds, description, keys."""
    from pydantic_core import PydanticUndefined

    from embedder.settings import (
        NOT_IN_KEYS,
        SECTIONS,
        SETTING_PATHS,
        SETTINGS_READ,
        HostSettings,
        ServiceSettings,
        flat_name,
        setting_field,
    )

    lines = [
        "# Configuration reference",
        "",
        "Generated from `embedder/settings.py` by `docs/gen_reference.py`. Values resolve in the order "
        "defaults, config file (`--config`, TOML or JSON), environment, then explicit values (CLI flags, the "
        "flow's parameters). The summary records where each value came from (`feature_toggles.sources`, by "
        "path).",
        "",
        "Settings sit in sections: in a TOML file a section is a table (`[embedder.fuse]` then `rrf_k = 10`), "
        "in a flow parameter or JSON file an object (`{\"fuse\": {\"rrf_k\": 10}}`), in the environment "
        "`EMBEDDER_<SECTION>__<NAME>` (`EMBEDDER_FUSE__RRF_K=10`). Each section setting also has the flat name "
        "of earlier releases (`rrf_k`, `EMBEDDER_RRF_K`): the environment keeps it as a short form; a config "
        "file or flow parameter that uses it still works and the run's summary carries a deprecation warning.",
        "",
        "**Keys** says which stages' stored results a setting shapes: changing it re-runs exactly those "
        "stages (the others are served from their keys); a setting that moves no key says why.",
    ]
    section_of = {path: path.partition(".")[0] if "." in path else "" for path in SETTING_PATHS}
    for section in ["", *SECTIONS]:
        if section:
            doc = (SECTIONS[section].__doc__ or "").strip().split("\n\n")[0]
            lines += ["", f"## `{section}`", "", _cell(doc)]
        else:
            lines += ["", "## Run", "", "The collections and files a run reads and writes, and run-wide switches."]
        lines += ["", "| setting | environment | type | default | bounds | description | keys |",
                  "|---|---|---|---|---|---|---|"]
        for path in (p for p in SETTING_PATHS if section_of[p] == section):
            info = setting_field(path)
            default = (info.default_factory() if info.default_factory is not None  # type: ignore[call-arg]
                       else info.default)
            default_text = "" if default is PydanticUndefined else f"`{_cell(default)}`"
            annotation = (info.annotation.__name__ if isinstance(info.annotation, type)
                          else re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", str(info.annotation)))
            stages = [stage for stage, paths in SETTINGS_READ.items() if path in paths]
            keys = ", ".join(stages) if stages else f"none: {NOT_IN_KEYS.get(path, '')}"
            if path == "collections":
                env = ""
            elif section:
                env = f"`EMBEDDER_{path.replace('.', '__').upper()}`, `EMBEDDER_{flat_name(path).upper()}`"
            else:
                env = f"`EMBEDDER_{path.upper()}`"
            name = f"`{path}`" + (f" (was `{flat_name(path)}`)" if section else "")
            lines.append(f"| {name} | {env} | `{_cell(annotation)}` | {default_text} | {_bounds(info)} | "
                         f"{_cell(info.description or '')} | {_cell(keys)} |")
    lines += ["", "## Connection and host settings", "",
              "Read from the environment only (they may hold secrets, or differ between the hosts of a fleet); "
              "never flow parameters.", "", "| environment | default | description |", "|---|---|---|"]
    for model in (ServiceSettings, HostSettings):
        for name, info in model.model_fields.items():
            aliases = getattr(info.validation_alias, "choices", None) or [name.upper()]
            default = "" if info.default is None else f"`{_cell(info.default)}`"
            lines.append(f"| {', '.join(f'`{a}`' for a in aliases)} | {default} | {_cell(info.description or '')} |")
    return "\n".join(lines) + "\n"


def cli() -> str:
    """Every command of ``embed-collections`` with its options, from the Typer app itself."""
    import typer

    from flows.cli import app

    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from `flows/cli.py` by `docs/gen_reference.py`.", ""]

    # Typer vendors its own click: commands are told apart by what they have, not by click's classes.
    def walk(command: Any, path: list[str]) -> None:
        if hasattr(command, "commands"):
            for name in sorted(command.commands):
                walk(command.commands[name], [*path, name])
            return
        lines.extend([f"## `{' '.join(path)}`", "", (command.help or "").strip().split("\n\n")[0], ""])
        params = [p for p in command.params if getattr(p, "param_type_name", "") == "option" and not p.hidden]
        if not params:
            return
        ctx = command.make_context(path[-1], [], resilient_parsing=True)
        lines.extend(["| option | type | default | help |", "|---|---|---|---|"])
        for p in params:
            flags = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            default = ("required" if p.required else "" if p.default is None or p.default is False
                       else f"`{_cell(str(p.default))}`")
            lines.append(f"| {flags} | {_cell(p.display_type(ctx).strip('<>'))} | {default} | {_cell(p.help or '')} |")
        lines.append("")

    walk(root, ["embed-collections"])
    return "\n".join(lines) + "\n"


def summary() -> str:
    """``processing_summary.json`` (v4.1): every section and field, from the pydantic models."""
    from embedder.summary import CURRENT_VERSION, ProcessingSummary

    schema = ProcessingSummary.model_json_schema(mode="serialization")
    defs = schema.get("$defs", {})

    def type_of(prop: dict[str, Any]) -> str:
        if "$ref" in prop:
            return prop["$ref"].rsplit("/", 1)[1]
        if "anyOf" in prop:
            return " or ".join(type_of(p) for p in prop["anyOf"])
        if prop.get("type") == "array":
            return f"list of {type_of(prop.get('items', {}))}"
        if prop.get("type") == "object" and isinstance(prop.get("additionalProperties"), dict):
            return f"map of {type_of(prop['additionalProperties'])}"
        if "enum" in prop:
            return " \\| ".join(json.dumps(v) for v in prop["enum"])
        if "const" in prop:
            return json.dumps(prop["const"])
        return str(prop.get("type", "any"))

    def table(title: str, model: dict[str, Any]) -> list[str]:
        out = [f"## {title}", ""]
        if model.get("description"):
            out += [model["description"].strip().split("\n\n")[0], ""]
        out += ["| field | type | description |", "|---|---|---|"]
        for name, prop in model.get("properties", {}).items():
            out.append(f"| `{name}` | {_cell(type_of(prop))} | {_cell(prop.get('description', ''))} |")
        return [*out, ""]

    lines = ["# Summary schema", "",
             f"`processing_summary.json`, schema {CURRENT_VERSION}. Generated from `embedder/summary.py` by "
             "`docs/gen_reference.py`. `embed-collections validate --strict PATH` checks a file against it.", ""]
    lines += table("ProcessingSummary", schema)
    for name in sorted(defs):
        lines += table(name, defs[name])
    return "\n".join(lines) + "\n"


def main() -> None:
    """Write ``configuration.md``, ``cli.md`` and ``summary.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reference")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, render in (("configuration.md", configuration), ("cli.md", cli), ("summary.md", summary)):
        (args.out / name).write_text(render(), encoding="utf-8")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
