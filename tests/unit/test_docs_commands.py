"""Every ``edgefleet ...`` command in the documentation's shell blocks exists, with the options it shows.

A reader copies these commands onto a real cluster; a renamed subcommand or option must fail here,
not there. Commands are taken from fenced shell code blocks (backslash continuations joined,
comments, pipes, redirections and ``$(...)`` split off), then resolved against the real click
command tree of ``edgefleet``: each subcommand must exist, each option must belong to the command
it is given to, and a command not asking for ``--help`` must give every required argument and
option. Values are not checked: placeholders (``KEYS_DIR``, ``<namespace>``, ``...``) are fine.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from edgefleet_core.cli.main import build_app

ROOT = Path(__file__).resolve().parents[2]
DOC_GLOBS = ("docs/*.md", "docs/gitops/*.md", "helm/edgefleet/README.md", "README.md")
SHELL_FENCES = frozenset({"", "sh", "bash", "shell", "console", "zsh"})
"""Info strings of the fenced blocks holding commands (yaml, ini, promql, ... blocks hold none)."""
PREFIXES = frozenset({"sudo", "env", "exec", "time", "nohup"})
"""Words that may precede a command in the same position (``sudo edgefleet ...``)."""
SYNOPSIS_MARKS = frozenset({"…"})
"""A word that marks a usage synopsis rather than a command to run (as do optional ``[...]`` parts)."""
SEPARATORS = frozenset({"|", "||", "&", "&&", ";", "(", ")"})
_REDIRECTION = re.compile(r"^(?:\d?>>?|&>)(&\d)?(.*)$|^<$")
"""``> file``, ``2>/dev/null``, ``2>&1``, ``< file``: the operator, and the target when attached
(``<namespace>`` is a placeholder, not a redirection)."""
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class DocCommand:
    """One ``edgefleet`` invocation found in a document."""

    source: str
    """``path:line`` of the line the command starts on."""
    args: tuple[str, ...]
    """The words after ``edgefleet``."""


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The fenced shell blocks of a Markdown text: (line number of the first line, lines)."""
    blocks: list[tuple[int, list[str]]] = []
    fence: str | None = None
    shell = False
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, shell, current, start = match.group(1), match.group(2).lower() in SHELL_FENCES, [], number + 1
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            if shell:
                blocks.append((start, current))
            fence = None
        else:
            current.append(line)
    return blocks


def logical_lines(first: int, lines: list[str]) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of the line it starts on."""
    joined: list[tuple[int, str]] = []
    pending: str | None = None
    pending_start = first
    for offset, raw in enumerate(lines):
        line = raw.rstrip()
        if pending is None:
            pending_start = first + offset
            line = line.lstrip()
            if line.startswith("$ "):  # a console prompt
                line = line[2:]
        text = line if pending is None else f"{pending} {line.strip()}"
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = None
        joined.append((pending_start, text))
    if pending is not None:
        joined.append((pending_start, pending))
    return joined


def commands_in_line(line: str) -> list[tuple[str, ...]]:
    """The ``edgefleet`` invocations of one shell line, each as the words after ``edgefleet``."""
    inner = _SUBSTITUTION.findall(line)
    line = _SUBSTITUTION.sub("SUBSTITUTED", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line
        words = []
    found: list[tuple[str, ...]] = []
    for segment in _segments(words):
        position = 0
        while position < len(segment) and (segment[position] in PREFIXES or _ASSIGNMENT.match(segment[position])):
            position += 1
        if position < len(segment) and Path(segment[position]).name == "edgefleet":
            found.append(tuple(segment[position + 1 :]))
    for text in inner:
        found.extend(commands_in_line(text))
    return found


def _segments(words: list[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in SEPARATORS:
            segments.append([])
        elif redirection := _REDIRECTION.match(word):
            skip_next = not (redirection.group(1) or redirection.group(2))  # its target is no argument
        else:
            segments[-1].append(word)
    return [segment for segment in segments if segment]


def commands_in_markdown(text: str, name: str) -> list[DocCommand]:
    """Every ``edgefleet`` invocation in the shell blocks of a Markdown text."""
    found: list[DocCommand] = []
    for first, lines in shell_blocks(text):
        for number, line in logical_lines(first, lines):
            found.extend(DocCommand(f"{name}:{number}", args) for args in commands_in_line(line))
    return found


def documented_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for pattern in DOC_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            found.extend(commands_in_markdown(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    return found


# typer (0.29) builds its commands on a click copy of its own (typer._click), so the tree is walked
# by what its objects have, not by click's classes.
Command = Any
HELP = "--help"


def _is_group(command: Command) -> bool:
    return bool(getattr(command, "commands", None))  # `edgefleet up` is a group without subcommands


def _is_option(param: Any) -> bool:
    return bool(param.param_type_name == "option")


def _option_names(command: Command) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for param in command.params:
        if _is_option(param):
            for name in (*param.opts, *param.secondary_opts):
                names[name] = param
    return names


def _takes_value(param: Any) -> bool:
    return _is_option(param) and not param.is_flag and not param.count


@dataclass
class _Walk:
    """Where resolving a command line got to."""

    command: Command
    path: list[str]
    given: set[str]
    """Names of the options given to ``command``."""
    positionals: int = 0
    wants_help: bool = False
    problem: str | None = None


def _walk(words: list[str], root: Command) -> _Walk:
    """Follow ``words`` down the command tree, stopping at the first unknown subcommand or option."""
    walk = _Walk(root, ["edgefleet"], set())
    index = 0
    while index < len(words) and walk.problem is None:
        word = words[index]
        index += 1
        if word == "--":
            walk.positionals += len(words) - index
            break
        where = " ".join(walk.path)
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0] if word.startswith("--") else word[:2]
            param = _option_names(walk.command).get(name)
            if name == HELP:
                walk.wants_help = True
            elif param is None:
                walk.problem = f"{where}: no option {name}"
            else:
                walk.given.add(param.name or name)
                attached = "=" in word if word.startswith("--") else len(word) > 2
                index += 1 if _takes_value(param) and not attached else 0
        elif _is_group(walk.command):
            sub = walk.command.commands.get(word)
            if sub is None:
                walk.problem = f"{where}: no subcommand {word!r} (has {', '.join(sorted(walk.command.commands))})"
            else:
                walk.command, walk.given, walk.positionals = sub, set(), 0
                walk.path.append(word)
        else:
            walk.positionals += 1
    return walk


def _incomplete(walk: _Walk) -> list[str]:
    """Arguments and required options a runnable command line lacks (or arguments too many)."""
    where = " ".join(walk.path)
    if _is_group(walk.command):
        return [f"{where}: a command group, not a command (has {', '.join(sorted(walk.command.commands))})"]
    found: list[str] = []
    arguments = [p for p in walk.command.params if p.param_type_name == "argument"]
    takes = sum(a.nargs for a in arguments)
    if all(a.nargs >= 0 for a in arguments) and walk.positionals > takes:
        found.append(f"{where}: {walk.positionals} positional argument(s), takes {takes}")
    needs = sum(a.nargs for a in arguments if a.required and a.nargs > 0)
    if walk.positionals < needs:
        found.append(f"{where}: {walk.positionals} positional argument(s), needs {needs}")
    # An option with an environment variable (the agent's --token) may come from it.
    found.extend(
        f"{where}: missing required option {param.opts[0]}"
        for param in walk.command.params
        if _is_option(param) and param.required and param.name not in walk.given and param.envvar is None
    )
    return found


def problems(args: tuple[str, ...], root: Command) -> list[str]:
    """What is wrong with ``edgefleet ARGS``: unknown subcommands and options, missing required ones.

    A usage synopsis (``[--recipe R.yaml]``, a trailing ``…``) is checked for its names only.
    """
    synopsis = any(word in SYNOPSIS_MARKS or word != word.strip("[]") for word in args)
    walk = _walk([word.strip("[]") for word in args if word.strip("[]")], root)
    if walk.problem is not None:
        return [walk.problem]
    if walk.wants_help or synopsis:
        return []
    return _incomplete(walk)


@pytest.fixture(scope="module")
def cli() -> Command:
    return typer.main.get_command(build_app())


DOCUMENTED = documented_commands()


def test_the_documents_hold_commands() -> None:
    sources = {command.source.split(":")[0] for command in DOCUMENTED}
    assert {"docs/install.md", "docs/upgrade.md", "docs/troubleshooting.md", "README.md"} <= sources
    assert len(DOCUMENTED) >= 40


@pytest.mark.parametrize("command", DOCUMENTED, ids=[command.source for command in DOCUMENTED])
def test_documented_command_exists(command: DocCommand, cli: Command) -> None:
    assert problems(command.args, cli) == [], f"{command.source}: edgefleet {' '.join(command.args)}"


# ------------------------------------------------------------------ the checker itself


SAMPLE = """\
Text with `edgefleet not-a-command` in prose is not checked.

```sh
edgefleet keys secret KEYS_DIR \\
    --namespace edgefleet-system | kubectl apply -f -   # the online keys
helm install edgefleet helm/edgefleet -n edgefleet-system
T="$(edgefleet gateway token create --store s3://b --namespace <ns> --device-class edge-cpu)" && echo "$T"
sudo /opt/edgefleet/current/bin/edgefleet agent status --state /var/lib/edgefleet-agent > status.txt
```

```yaml
command: [edgefleet, no-such-thing]
```

```bash
edgefleet keys frobnicate --store s3://b
```
"""


def test_sample_extraction() -> None:
    found = commands_in_markdown(SAMPLE, "sample.md")
    assert [(c.source, c.args) for c in found] == [
        ("sample.md:4", ("keys", "secret", "KEYS_DIR", "--namespace", "edgefleet-system")),
        (
            "sample.md:7",
            ("gateway", "token", "create", "--store", "s3://b", "--namespace", "<ns>", "--device-class", "edge-cpu"),
        ),
        ("sample.md:8", ("agent", "status", "--state", "/var/lib/edgefleet-agent")),
        ("sample.md:16", ("keys", "frobnicate", "--store", "s3://b")),
    ]


def test_real_commands_pass(cli: Command) -> None:
    for args in (
        ("keys", "secret", "KEYS_DIR", "--namespace", "edgefleet-system"),
        ("keys", "root", "--store", "s3://b", "--keys", "KEYS_DIR", "-o", "root.json"),
        ("gateway", "pki", "init", "PKI_DIR", "--host", "a", "--host=b"),
        ("operator", "run", "--store", "s3://b", "--keys", "k", "-A", "--standalone", "--build-mode", "jobs"),
        ("-vv", "keys", "init", "k", "--no-force"),
        ("agent", "run", "--help"),
    ):
        assert problems(args, cli) == [], args


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("keys", "frobnicate"), "edgefleet keys: no subcommand 'frobnicate'"),
        (("keys", "init", "DIR", "--bogus"), "edgefleet keys init: no option --bogus"),
        (
            (
                "gateway",
                "token",
                "create",
                "--store",
                "s",
                "--namespace",
                "n",
                "--device-class",
                "c",
                "--ttl-days",
                "7",
            ),
            "edgefleet gateway token create: no option --ttl-days",
        ),
        (("keys", "root", "--store", "s3://b", "--keys", "k"), "edgefleet keys root: missing required option --out"),
        (("gateway", "pki", "init"), "edgefleet gateway pki init: 0 positional argument(s), needs 1"),
        (("gateway", "pki", "init", "A", "B"), "edgefleet gateway pki init: 2 positional argument(s), takes 1"),
        (("gateway", "pki"), "edgefleet gateway pki: a command group, not a command"),
        (("operator", "run", "--store", "s", "--keys", "k", "-x"), "edgefleet operator run: no option -x"),
    ],
)
def test_made_up_commands_fail(args: tuple[str, ...], problem: str, cli: Command) -> None:
    found = problems(args, cli)
    assert found, args
    assert found[0].startswith(problem), found


def test_a_made_up_command_in_a_document_fails(cli: Command) -> None:
    found = commands_in_markdown(SAMPLE, "sample.md")
    assert [c.source for c in found if problems(c.args, cli)] == ["sample.md:16"]
