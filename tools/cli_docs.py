"""Write docs/cli.md, the CLI reference, as plain Markdown generated from the Typer app.

    python tools/cli_docs.py > docs/cli.md

typer's own ``typer ... utils docs`` renders rich markup as HTML ``<span>`` tags and escapes
quotes as entities, and cuts command summaries; this keeps the help text as written, turns
``[bold]`` into ``**``, and puts each command's examples in a code block.
"""

from __future__ import annotations

import inspect
import re
import sys

_TAG = re.compile(r"\[(/?)([a-z ]*)\]")


def _no_tags(text: str) -> str:
    """``<out>`` outside code spans as ``\\<out>``, or Markdown would take it for an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def plain(text: str) -> str:
    """rich markup -> Markdown: ``[bold]x[/]`` -> ``**x**``, other styles dropped."""
    return _no_tags(_markup(text))


def _markup(text: str) -> str:
    out, stack, i = [], [], 0
    for match in _TAG.finditer(text):
        start = match.start()
        if start > 0 and text[start - 1] == "\\":  # an escaped bracket: literal text
            out.append(text[i : start - 1] + match.group(0))
            i = match.end()
            continue
        out.append(text[i:start])
        closing, style = match.group(1), match.group(2)
        if closing:
            if stack and stack.pop() == "bold":
                out.append("**")
        elif style in ("bold", "dim", "italic", "red", "yellow", "green"):
            stack.append(style)
            if style == "bold":
                out.append("**")
        else:
            out.append(match.group(0))
        i = match.end()
    out.append(text[i:])
    return "".join(out)


def _help_body(help_text: str) -> list[str]:
    """The help text as paragraphs; the indented lines of an Examples part as one block."""
    lines = inspect.cleandoc(help_text).splitlines()
    body: list[str] = []
    block: list[str] = []
    for line in lines:
        if line.startswith("  ") and line.strip():
            block.append(line.strip())
            continue
        if block and not line.strip():
            continue  # blank lines between examples stay inside the block
        if block:
            body += ["```console", *(f"$ {b}" for b in block), "```", ""]
            block = []
        body.append(plain(line))
    if block:
        body += ["```console", *(f"$ {b}" for b in block), "```"]
    while body and not body[-1].strip():
        body.pop()
    return body


def _param_line(param, ctx) -> str:
    from typer.core import TyperArgument

    help_text = plain(getattr(param, "help", None) or "")
    if isinstance(param, TyperArgument):
        name = param.metavar or param.name.upper()
        required = " (required)" if param.required else ""
        return f"* `{name}`: {help_text}{required}"
    names = ", ".join(param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    if not param.is_flag:
        kind = param.display_type_rich(ctx=ctx)
        names += f" {kind}" if kind else ""
    return f"* `{names}`: {help_text}"


def render(app, name: str) -> str:
    import typer

    group = typer.main.get_command(app)
    root_ctx = group.context_class(group, info_name=name)
    lines = [f"# `{name}`", "", *_help_body(group.help or ""), ""]
    lines += ["**Usage**:", "", "```console", f"$ {name} [OPTIONS] COMMAND [ARGS]...", "```", ""]
    lines += ["**Options**:", ""]
    lines += [_param_line(p, root_ctx) for p in group.get_params(root_ctx) if p.help]
    if group.epilog:
        lines += ["", plain(group.epilog)]
    lines += ["", "**Commands**:", ""]
    commands = group.commands
    for cmd_name, cmd in commands.items():
        summary = plain(inspect.cleandoc(cmd.help or "").splitlines()[0])
        lines.append(f"* `{cmd_name}`: {summary}")
    for cmd_name, cmd in commands.items():
        lines += _command(cmd, f"{name} {cmd_name}", cmd_name, root_ctx, "##")
    return "\n".join(lines).replace("\\[", "[") + "\n"


def _command(cmd, full_name: str, cmd_name: str, parent_ctx, level: str) -> list[str]:
    """One command's section; a group's (``benchmark``) lists its commands, then each."""
    ctx = cmd.context_class(cmd, info_name=cmd_name, parent=parent_ctx)
    lines = ["", f"{level} `{full_name}`", "", *_help_body(cmd.help or ""), ""]
    if hasattr(cmd, "commands"):  # a group
        lines += ["**Usage**:", "", "```console", f"$ {full_name} COMMAND [ARGS]...", "```", ""]
        lines += ["**Commands**:", ""]
        for sub_name, sub in cmd.commands.items():
            summary = plain(inspect.cleandoc(sub.help or "").splitlines()[0])
            lines.append(f"* `{sub_name}`: {summary}")
        for sub_name, sub in cmd.commands.items():
            lines += _command(sub, f"{full_name} {sub_name}", sub_name, ctx, level + "#")
        return lines
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines += ["**Usage**:", "", "```console", f"$ {full_name} {usage}", "```", ""]
    params = [p for p in cmd.get_params(ctx) if p.help or p.param_type_name == "argument"]
    arguments = [p for p in params if p.param_type_name == "argument"]
    options = [p for p in params if p.param_type_name == "option"]
    if arguments:
        lines += ["**Arguments**:", "", *(_param_line(p, ctx) for p in arguments), ""]
    lines += ["**Options**:", "", *(_param_line(p, ctx) for p in options)]
    return lines


def main() -> None:
    from threengan_cli.cli.app import app

    sys.stdout.write(render(app, "threengan"))


if __name__ == "__main__":
    main()
