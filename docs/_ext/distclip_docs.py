"""Pages generated from the code, so that the docs cannot drift from it.

* ``.. distclip-config::`` (or a ``{distclip-config}`` fence): every config key of
  :class:`distclip.ClipConfig` and its sections, with type, default, allowed values and meaning,
  read from the pydantic models.
* ``{distclip-cli}``: the ``--help`` of every ``distclip`` subcommand, from the command itself.
* ``{distclip-bench} path.json``: a table of a ``distclip bench --json`` result, with machine and date.
"""

from __future__ import annotations

import io
import json
import re
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from docutils import nodes
from docutils.parsers.rst import Directive
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# ------------------------------------------------------------------ configuration reference


def _type_name(annotation: Any) -> str:
    """A short, readable name for a field's type."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return f"{annotation.__name__} (section)"
        return {"NoneType": "null", "str": "string", "float": "number", "int": "integer", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _docstring_attributes(model: type[BaseModel]) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section of the model's docstring."""
    doc = model.__doc__ or ""
    match = re.search(r"Attributes:\n(.*)", doc, flags=re.S)
    if not match:
        return {}
    out: dict[str, str] = {}
    name = None
    for line in match.group(1).splitlines():
        entry = re.match(r"\s{4,8}(\w+): (.*)", line)
        if entry and len(line) - len(line.lstrip()) <= 8:
            name = entry.group(1)
            out[name] = entry.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
        elif not line.strip():
            name = None
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found = []
    for arg in (get_args(annotation) or [annotation]):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            found.append(arg)
        elif get_args(arg):
            found += _models_in(arg)
    return found


def _config_sections(root: type[BaseModel]) -> list[type[BaseModel]]:
    order, todo = [], [root]
    while todo:
        model = todo.pop(0)
        if model in order:
            continue
        order.append(model)
        for field in model.model_fields.values():
            todo += [m for m in _models_in(field.annotation) if m not in order]
    return order


def _table(headers: list[str], rows: list[list[str]], widths: list[int] | None = None) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths or [1] * len(headers):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += _row(headers)
    body = nodes.tbody()
    group += body
    for row in rows:
        body += _row(row)
    return table


def _row(cells: list[str]) -> nodes.row:
    row = nodes.row()
    for text in cells:
        entry = nodes.entry()
        entry += nodes.paragraph(text=text)
        row += entry
    return row


class ConfigReference(Directive):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from distclip import ClipConfig

        out: list[nodes.Node] = []
        for model in _config_sections(ClipConfig):
            section = nodes.section(ids=[f"config-{model.__name__.lower()}"])
            section += nodes.title(text=model.__name__ if model is not ClipConfig else "ClipConfig (top level)")
            summary = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            section += nodes.paragraph(text=summary)
            described = _docstring_attributes(model)
            rows = []
            for name, field in model.model_fields.items():
                default = field.default if not field.is_required() else "(required)"
                if isinstance(default, BaseModel):
                    default = default.model_dump()
                meaning = field.description or described.get(name, "")
                rows.append([name, _type_name(field.annotation), json.dumps(default) if not isinstance(default, str)
                             or default == "(required)" else repr(default), _constraints(field), meaning])
            section += _table(["key", "type", "default", "constraints", "meaning"], rows, [3, 4, 3, 2, 10])
            out.append(section)
        return out


# ------------------------------------------------------------------ CLI reference


class CliReference(Directive):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from distclip.cli.main import COMMANDS, main

        out: list[nodes.Node] = []
        for name, (summary, _) in [("distclip", ("the command", None)), *COMMANDS.items()]:
            argv = ["--help"] if name == "distclip" else [name, "--help"]
            buffer = io.StringIO()
            with redirect_stdout(buffer), redirect_stderr(buffer):
                try:
                    main(argv)
                except SystemExit:
                    pass
            section = nodes.section(ids=[f"cli-{name}"])
            section += nodes.title(text=name if name == "distclip" else f"distclip {name}")
            section += nodes.paragraph(text=summary)
            section += nodes.literal_block(text=buffer.getvalue().rstrip())
            out.append(section)
        return out


# ------------------------------------------------------------------ benchmark tables


class BenchTable(Directive):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        path = Path(env.srcdir) / self.arguments[0]
        env.note_dependency(str(path))
        data = json.loads(path.read_text())
        out: list[nodes.Node] = [nodes.paragraph(text=f"Measured on {data.get('machine', '?')}, {data.get('date', '?')}"
                                                 + (f"; {data['note']}" if data.get("note") else ""))]
        rows = data["rows"]
        headers = list(rows[0]) if rows else []
        out.append(_table(headers, [[_fmt(r.get(h)) for h in headers] for r in rows]))
        return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("distclip-config", ConfigReference)
    app.add_directive("distclip-cli", CliReference)
    app.add_directive("distclip-bench", BenchTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
