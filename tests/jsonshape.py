"""docs/JSON.md, read as a schema: the tests check real ``--json`` output against it.

The document's field tables (``| field | type | meaning |``) are parsed per
section (``## `blockvault backup` ``, ``## Shape `pack` ``, ``## Failure``);
``check(doc, section)`` returns every way a real document differs from what
the section says: a field that is not documented, a value of another type, a
required field missing.  See docs/JSON.md's introduction for the notation.
"""

from __future__ import annotations

import os
import re

from helpers import REPO_ROOT

DOC = os.path.join(REPO_ROOT, "docs", "JSON.md")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
TYPES = {"bool", "int", "number", "str", "null", "list", "object"}


def parse(path: str = DOC) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """(sections: name → [(field, type)], error codes: code → exit code)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    codes: dict[str, int] = {}
    name, header = None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                m = re.search(r"`([^`]+)`", line)
                title = line[3:]
                if title.startswith("Failure"):
                    name = "error"
                elif title.startswith("Shape") and m:
                    name = m.group(1)
                elif m and m.group(1).startswith("blockvault "):
                    name = m.group(1)[len("blockvault "):]
                else:
                    name = None
                header = None
                continue
            if not line.startswith("|") or name is None:
                if not line.startswith("|"):
                    header = None
                continue
            cells = [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line)[1:-1]]
            if header is None:
                header = cells
                continue
            if set(cells[0]) <= {"-", " "}:
                continue
            key = cells[0].strip("`")
            if header[:2] == ["field", "type"]:
                sections.setdefault(name, []).append((key, cells[1]))
            elif header[:2] == ["code", "exit"]:
                codes[key] = int(cells[1])
    return sections, codes


def _type(text: str) -> tuple[set[str], bool]:
    optional = text.endswith(" optional")
    if optional:
        text = text[: -len(" optional")]
    return {t.strip() for t in text.split("|")}, optional


def expand(sections: dict, name: str, prefix: str = "") -> dict[str, tuple[set[str], bool]]:
    """Every documented path of a section: path → (types, optional); shapes inlined."""
    out: dict[str, tuple[set[str], bool]] = {}
    for field, typ in sections[name]:
        types, optional = _type(typ)
        if field == "*":
            (shape,) = types
            out.update(expand(sections, shape, prefix))
            continue
        path = f"{prefix}.{field}" if prefix else field
        shapes = types - TYPES
        if shapes:
            assert len(types) == 1, f"{name}: {field}: a shape cannot be joined with other types"
            out[path] = ({"object"}, optional)
            out.update(expand(sections, shapes.pop(), path))
        else:
            out[path] = (types, optional)
    return out


def _type_ok(value, types: set[str]) -> bool:
    if isinstance(value, bool):
        return "bool" in types
    if isinstance(value, int):
        return bool(types & {"int", "number"})
    if isinstance(value, float):
        return "number" in types
    if isinstance(value, str):
        return "str" in types
    if value is None:
        return "null" in types
    if isinstance(value, list):
        return "list" in types
    if isinstance(value, dict):
        return "object" in types
    return False


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def check(doc: dict, section: str, sections: dict | None = None) -> list[str]:
    """Every difference between ``doc`` and the section's fields (empty: it matches)."""
    sections = sections or parse()[0]
    spec = expand(sections, section)
    problems: list[str] = []

    def required_children(path: str) -> list[str]:
        return [p for p, (_, opt) in spec.items()
                if not opt and _parent(p) == path and not p.endswith((".*", "[]")) and p != path]

    def visit(value, path: str) -> None:
        if path:
            if path not in spec:
                problems.append(f"{section}: field {path} is not documented (value {value!r:.80})")
                return
            types, _ = spec[path]
            if not _type_ok(value, types):
                problems.append(f"{section}: {path} is {type(value).__name__} {value!r:.80}, documented {types}")
        if isinstance(value, dict):
            for child in required_children(path):
                if child.rpartition(".")[2] not in value:
                    problems.append(f"{section}: required field {child} is missing")
            wildcard = f"{path}.*" if path else "*"
            for key, sub in value.items():
                visit(sub, wildcard if wildcard in spec else (f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            for item in value:
                visit(item, f"{path}[]")

    # The root's required fields: children of "" are the paths without a dot.
    visit(doc, "")
    return problems
