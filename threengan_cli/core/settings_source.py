"""A settings model's defaults and descriptions, read from its class body in the source: the
literals pydantic reads, without importing pydantic.

``--help`` must stay fast, and importing ``settings`` (pydantic with it) costs about 230 ms,
more than the rest of ``threengan --help`` together (``python -X importtime -m threengan_cli
--help``, 2026-11-26). So ``cli/common`` builds each option's help and default from these;
``tests/test_cli.py`` checks every field against the real model.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]


@cache
def literal_fields(module: str, cls: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Field name -> default, and field name -> description, of the class ``cls`` in
    ``module`` (a path under the package, ``core/settings.py``); fields without one left out."""
    # Only the class's own lines are parsed: the whole of grid.py takes tens of ms.
    lines = (_PACKAGE / module).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"class {cls}("))
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
        len(lines),
    )
    tree = ast.parse("\n".join(lines[start:end]))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found: dict[str, Any] = {}
    described: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        value = node.value
        if value is None:
            continue
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field":
            text = next((k.value for k in value.keywords if k.arg == "description"), None)
            if text is not None:
                described[node.target.id] = ast.literal_eval(text)
            given = value.args[0] if value.args else None
            given = given or next((k.value for k in value.keywords if k.arg == "default"), None)
            if given is None:
                continue  # required: the profile or the caller supplies it
            value = given
        if isinstance(value, ast.Name):  # a module constant, e.g. DEFAULT_RECIPE
            value = _constant(lines, value.id)
        found[node.target.id] = ast.literal_eval(value)
    return found, described


def _constant(lines: list[str], name: str) -> ast.expr:
    """The value of the module-level ``name = literal`` (or ``name: T = literal``)."""
    line = next(x for x in lines if x.startswith((f"{name} =", f"{name}:")))
    node = ast.parse(line).body[0]
    assert isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
    return node.value
