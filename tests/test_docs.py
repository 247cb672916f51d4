"""The user docs stay honest: links (and their #anchors) resolve, named paths
and modules exist, every ``dqd-ray`` command line shown (usage synopses
included) parses with the CLI's own parser, every ``--set`` key and
``--preset`` it passes is a real setting, as is every config key written in
inline code (`td3.lr`), and every ``make TARGET`` is a Makefile target.

Fast and self-contained: no Ray, no simulation. The docs are README.md,
CHANGELOG.md and docs/*.md (paths and module names: not in the changelog, which
is history). Each check is a small pure function over one
Markdown text that returns ``(line, problem)`` pairs; the tests run them on
every doc and list all problems at once as ``file:line: problem``.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib
import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from dqd_ray import config
from dqd_ray.cli import build_parser
from dqd_ray.config import PRESETS, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# The guides describe the code as it is; the changelog is history and may name
# files and modules that were since moved or removed (its links still resolve).
GUIDES = [d for d in DOCS if d.name != "CHANGELOG.md"]

Problem = tuple[int, str]  # (1-based line, what is wrong)

# An all-caps word standing for a value the reader fills in: RUN_DIR, FILE, N, KEY.
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+"[^"]*")?\s*\)')
_INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MODULE = re.compile(r"(?<![\w./-])dqd_ray(?:\.[A-Za-z_]\w*)+")
# The program at the start of a line (after `$ ` or a path such as .venv/bin/),
# or as the entrypoint after ` -- ` (`ray job submit ... -- dqd-ray run ...`).
_COMMAND = re.compile(r"(?:^\s*|\s--\s+)(?:\$\s+)?(?:[^\s`]*/)?dqd-ray(?=\s)")
_MAKE = re.compile(r"^\s*(?:\$\s+)?make(?=\s|$)")
_SHELL_STOPS = {"|", "||", "&&", ";", "&"}
_REDIRECT = re.compile(r"^\d*(?:>|<)")


# -- Markdown ---------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """Fenced code blocks: (line of the first content line, content lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, inside = [], False
    for line in text.splitlines():
        fence = bool(_FENCE.match(line))
        out.append("" if inside or fence else line)
        if fence:
            inside = not inside
    return "\n".join(out)


def inline_code(text: str) -> list[tuple[int, str]]:
    """Inline code spans outside code blocks: (line, text with whitespace
    collapsed); a span may continue over the lines of one paragraph."""
    spans = []
    lines = prose(text).split("\n")
    start = 0
    while start < len(lines):
        end = start
        while end < len(lines) and lines[end].strip():
            end += 1
        paragraph = "\n".join(lines[start:end])
        for m in _INLINE_CODE.finditer(paragraph):
            line = start + 1 + paragraph.count("\n", 0, m.start())
            spans.append((line, " ".join(m.group(1).split())))
        start = end + 1
    return spans


def _blank_inline_code(text: str) -> str:
    return _INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def find_links(text: str) -> list[tuple[int, str]]:
    """Markdown links and images outside code: (line, target)."""
    body = _blank_inline_code(prose(text))
    return [(body.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(body)]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings (lowercase, punctuation dropped,
    spaces to hyphens, -1, -2 ... for repeats)."""
    anchors: set[str] = set()
    for line in prose(text).splitlines():
        m = _HEADING.match(line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(2).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


# -- 1. links ---------------------------------------------------------------------------


def link_problems(text: str, base: Path) -> list[Problem]:
    """Relative links that do not resolve from ``base`` (the doc's folder); a
    fragment into a Markdown file must name one of its headings."""
    problems = []
    for line, target in find_links(text):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path, _, fragment = target.partition("#")
        if not path:  # a link into this same file
            if fragment and fragment not in heading_anchors(text):
                problems.append((line, f"link {target}: no heading with that anchor here"))
            continue
        resolved = base / path
        if not resolved.exists():
            problems.append((line, f"link {target}: {path} does not exist"))
        elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(
                resolved.read_text()):
            problems.append((line, f"link {target}: no heading with that anchor in {path}"))
    return problems


# -- 2. paths and modules ---------------------------------------------------------------


@functools.cache
def repo_roots() -> tuple[str, ...]:
    """The repository's top-level entries, less what git ignores (.venv, runs ...)."""
    ignored = [".git"]
    gitignore = ROOT / ".gitignore"
    if gitignore.exists():
        ignored += [p.strip().rstrip("/") for p in gitignore.read_text().splitlines()
                    if p.strip() and not p.startswith("#")]
    return tuple(sorted(p.name for p in ROOT.iterdir()
                        if not any(fnmatch.fnmatch(p.name, pat) for pat in ignored)))


def _code_snippets(text: str) -> list[tuple[int, str]]:
    """Every line of the code blocks and every inline code span: (line, text)."""
    snippets = list(inline_code(text))
    for start, lines in code_blocks(text):
        snippets += [(start + i, line) for i, line in enumerate(lines)]
    return snippets


def path_tokens(text: str) -> list[tuple[int, str]]:
    """Words of the code that name a repository path: they start with a
    top-level entry. Placeholders and run outputs (RUN_DIR, <stamp>, ...)
    are left out."""
    roots = repo_roots()
    tokens = []
    for line, snippet in _code_snippets(text):
        for word in re.split(r"[\s,;()\"'`=|]+", snippet):
            if re.search(r"[<>{}$~]|\.\.\.", word):
                continue
            word = word.rstrip(".:")  # the end of a sentence
            if not any(word.startswith(r + "/") if (ROOT / r).is_dir() else word == r
                       for r in roots):
                continue
            if any(_PLACEHOLDER.match(part) for part in word.split("/")):
                continue
            tokens.append((line, word))
    return tokens


def check_path(token: str) -> str | None:
    """None when the repository has ``token`` (a glob: when it matches something)."""
    if any(c in token for c in "*?["):
        return None if any(ROOT.glob(token)) else f"{token}: matches nothing in the repository"
    return None if (ROOT / token).exists() else f"{token}: no such file or directory"


def path_problems(text: str) -> list[Problem]:
    return [(line, msg) for line, token in path_tokens(text)
            if (msg := check_path(token)) is not None]


def module_names(text: str) -> list[tuple[int, str]]:
    """Dotted names ``dqd_ray.a.b`` written in code: (line, name)."""
    return [(line, m.group(0)) for line, snippet in _code_snippets(text)
            for m in _MODULE.finditer(snippet)]


def check_module(name: str) -> str | None:
    """None when ``name`` is a module or an attribute of one: imports the
    longest importable prefix, then looks the rest up as attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError as err:
            if err.name and (prefix == err.name or prefix.startswith(err.name + ".")):
                continue  # this prefix is no module: try a shorter one
            return f"{name}: importing {prefix} fails: {err}"
        for j, attr in enumerate(parts[i:], i):
            if not hasattr(obj, attr):
                return f"{name}: {'.'.join(parts[:j])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"{name}: no such module"


def module_problems(text: str) -> list[Problem]:
    return [(line, msg) for line, name in module_names(text)
            if (msg := check_module(name)) is not None]


# -- 3. command lines -------------------------------------------------------------------


def command_lines(text: str) -> list[tuple[int, str, bool]]:
    """``dqd-ray`` command lines: (line, the arguments after the program,
    inline). Code-block lines are joined over ``\\`` continuations; inline
    spans count when they start with ``dqd-ray ``."""
    commands = []
    for start, lines in code_blocks(text):
        i = 0
        while i < len(lines):
            first, logical = i, [lines[i]]
            while logical[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                logical[-1] = logical[-1].rstrip()[:-1]
                i += 1
                logical.append(lines[i])
            i += 1
            joined = "\n".join(logical)  # newlines end shell comments
            m = _COMMAND.search(joined)
            if m:
                line = start + first + joined.count("\n", 0, m.start())
                commands.append((line, joined[m.end():], False))
    for line, span in inline_code(text):
        m = _COMMAND.match(span)
        if m and m.start() == 0:
            commands.append((line, span[m.end():], True))
    return commands


def _groups(tokens: list[str]) -> list[list[list[str]]]:
    """A usage line as elements, each a list of alternatives (token lists):
    a plain word is one alternative; ``[a b | c d]`` is two. A shell
    operator or redirection outside brackets ends the command."""
    elements: list[list[list[str]]] = []
    group: list[list[str]] | None = None
    for tok in tokens:
        if group is None and tok.startswith("["):
            group, tok = [[]], tok[1:]
        if group is None:
            if tok in _SHELL_STOPS or _REDIRECT.match(tok):
                break
            elements.append([[tok]])
            continue
        closes = tok.endswith("]") and tok.count("]") > tok.count("[")
        tok = tok[:-1] if closes else tok
        if tok == "|":
            group.append([])
        elif tok:
            group[-1].append(tok)
        if closes:
            flag = group[0][0] if group[0] and group[0][0].startswith("-") else None
            for alt in group[1:]:  # `[--set K=V | P:K=V]`: the flag takes either value
                if flag and alt and not alt[0].startswith("-"):
                    alt.insert(0, flag)
            elements.append(group)
            group = None
    if group is not None:
        raise ValueError("a [ without its ]")
    return [[split for alt in element for split in _split_values(alt)] for element in elements]


def _split_values(alt: list[str]) -> list[list[str]]:
    """``--elite best|random`` stands for ``--elite best`` and ``--elite random``."""
    n = max([1] + [tok.count("|") + 1 for tok in alt if tok != "|"])
    return [[tok if tok == "|" else tok.split("|")[min(k, tok.count("|"))] for tok in alt]
            for k in range(n)]


def _drop_ellipsis(alt: list[str]) -> list[str] | None:
    """``S ...`` (more of the same) loses its ``...``; ``--flag ...`` (some
    value) cannot be parsed: None."""
    out: list[str] = []
    for tok in alt:
        if tok == "...":
            if not out or out[-1].startswith("-"):
                return None
            continue
        out.append(tok)
    return out


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that the subcommand words of ``argv`` lead to."""
    for tok in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tok not in subs[0].choices:
            break
        parser = subs[0].choices[tok]
    return parser


def _subcommand_dests(argv: list[str]) -> set[str]:
    """The names argparse gives the subcommand ``argv`` leaves out, if any."""
    return {a.dest for a in _subparser(build_parser(), argv)._actions
            if isinstance(a, argparse._SubParsersAction)}


def _fill_placeholders(argv: list[str]) -> list[str]:
    """An all-caps placeholder after an option with a type or choices (``--steps
    N``, ``--device D``) becomes a value the option takes."""
    options = _subparser(build_parser(), argv)._option_string_actions
    out, action = [], None
    for tok in argv:
        if tok.startswith("-"):
            action = options.get(tok)
            if action is not None and action.nargs == 0:
                action = None  # a switch takes no value
        elif action is not None:
            if _PLACEHOLDER.match(tok) and action.choices:
                tok = str(next(iter(action.choices)))
            elif _PLACEHOLDER.match(tok) and action.type in (int, float):
                tok = "1"
            if action.nargs not in ("+", "*"):
                action = None  # the option's one value: what follows is positional
        out.append(tok)
    return out


class Unparseable(ValueError):
    """A command line with a placeholder that no parser could take."""


def argv_variants(command: str) -> tuple[list[list[str]], list[str]]:
    """The argument lists a command line (possibly a usage synopsis) stands
    for, and notes on what was left out. Optional groups ``[...]`` are
    included; the i-th variant takes the i-th alternative of every group and
    of every ``a|b|c`` word, so each alternative is parsed at least once.

    Raises:
        Unparseable: ``--option ...`` outside brackets (the line is skipped).
        ValueError: Unbalanced quotes or brackets (a broken line).
    """
    elements, notes = [], []
    for element in _groups(shlex.split(command, comments=True)):
        alts = [a for a in map(_drop_ellipsis, element) if a is not None]
        if not alts:
            if len(element) == 1 and len(element[0]) == 1:  # a bare `...` word
                if elements and not elements[-1][0][-1].startswith("-"):
                    continue  # `FILE ...`: more of the same
                raise Unparseable("an option followed by `...`")
            notes.append("left out [" + " | ".join(" ".join(a) for a in element) + "]")
            continue
        elements.append(alts)
    variants = []
    for i in range(max([1] + [len(alts) for alts in elements])):
        argv = [tok for alts in elements for tok in alts[min(i, len(alts) - 1)]]
        argv = _fill_placeholders(argv)
        if argv not in variants:
            variants.append(argv)
    return variants, notes


def parse_argv(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parses with the CLI's own parser: (namespace, None), (None, None) for
    --help, or (None, argparse's message)."""
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv), None
    except SystemExit as exit_:
        if exit_.code == 0:
            return None, None
        lines = err.getvalue().strip().splitlines()
        return None, lines[-1] if lines else f"exit {exit_.code}"


@functools.cache
def parse_command(command: str, inline: bool) -> tuple[tuple, tuple, tuple]:
    """(parsed (argv, namespace) pairs, problems, notes) of one command line.
    An inline mention may leave out required positionals (`dqd-ray render
    --frame-every 8`): they are filled in with their names."""
    try:
        variants, notes = argv_variants(command)
    except Unparseable as err:
        return (), (), (f"not checked: {err}",)
    except ValueError as err:
        return (), (f"`dqd-ray {command.strip()}`: cannot be split: {err}",), ()
    parsed, problems = [], []
    for argv in variants:
        ns, msg = parse_argv(argv)
        missing = re.search(r"the following arguments are required: (.+)", msg or "")
        if inline and missing:
            names = missing.group(1).split(", ")
            if set(names) <= _subcommand_dests(argv):  # `dqd-ray bench`: a command group
                continue
            argv = argv + names
            ns, msg = parse_argv(argv)
        if msg:
            problems.append(f"`dqd-ray {shlex.join(argv)}`: {msg}")
        elif ns is not None:
            parsed.append((argv, ns))
    return tuple(parsed), tuple(problems), tuple(notes)


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return frozenset(targets)


def make_commands(text: str) -> list[tuple[int, list[str]]]:
    """``make TARGET ...`` in inline code and code blocks: (line, targets)."""
    out = []
    for line, snippet in _code_snippets(text):
        if _MAKE.match(snippet):
            try:
                words = shlex.split(snippet, comments=True)[1:]
            except ValueError:  # unbalanced quotes: plain words will do
                words = snippet.split()[1:]
            stop = next((i for i, w in enumerate(words) if w in _SHELL_STOPS), len(words))
            out.append((line, [w for w in words[:stop] if "=" not in w
                               and not w.startswith("-")]))
    return out


def command_problems(text: str) -> list[Problem]:
    """Command lines the CLI's parser rejects (and make targets the Makefile lacks)."""
    problems = []
    for line, command, inline in command_lines(text):
        _, found, _ = parse_command(command, inline)
        problems += [(line, msg) for msg in found]
    for line, targets in make_commands(text):
        problems += [(line, f"`make {t}`: the Makefile has no target {t!r}")
                     for t in targets if t not in make_targets()]
    return problems


# -- 4. --set keys and presets ----------------------------------------------------------


def _submodels(annotation) -> tuple[list[type[BaseModel]], bool]:
    """The pydantic models a field's annotation holds, and whether it is a dict."""
    models, is_dict, todo = [], False, [annotation]
    while todo:
        a = todo.pop()
        origin = get_origin(a)
        if origin is None and isinstance(a, type) and issubclass(a, BaseModel):
            models.append(a)
        elif a is dict or origin is dict:
            is_dict = True
        elif origin in (Union, UnionType, Annotated):
            todo.extend(get_args(a))
    return models, is_dict


def algorithm_configs() -> list[type[BaseModel]]:
    """Every algorithm's settings class: ``dqd_ray.config.ALGORITHM_CONFIGS``, or
    the algorithm registry's ``configs()`` where the config no longer holds them."""
    table = getattr(config, "ALGORITHM_CONFIGS", None)
    if table is None:
        from dqd_ray import algorithms

        table = algorithms.configs()
    return list(table.values())


def check_set_key(key: str, model: type[BaseModel] = ExperimentConfig) -> str | None:
    """None when the dotted ``key`` names a field of ``model`` (through nested
    models; ``algorithm.X``: a field of any algorithm; one level below a
    dict-typed field is free)."""
    if not key or _PLACEHOLDER.match(key):
        return None
    parts = key.split(".")
    models = [model]
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if not models:
            return f"{key}: {where} is a value, it has no settings below it"
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            known = sorted({name for m in models for name in m.model_fields})
            return f"{key}: no setting {part!r} at {where} (it has: {', '.join(known)})"
        if model is ExperimentConfig and i == 0 and part == "algorithm":
            models = algorithm_configs()
            continue
        models, is_dict = [], False
        for field in fields:
            sub, field_is_dict = _submodels(field.annotation)
            models += sub
            is_dict = is_dict or field_is_dict
        if is_dict and not models:
            if len(parts) - i - 1 > 1:
                return f"{key}: {'.'.join(parts[:i + 1])} is a mapping: one key below it"
            return None
    return None


def check_tune_set_key(key: str) -> str | None:
    """A ``dqd-ray tune --set`` key: a sweep-file field when it starts with one
    (``param_space.X`` and ``base.set.X``: X a config key), else a config key."""
    from dqd_ray.sweeps.file import SweepFile

    head, _, rest = key.partition(".")
    if head == "param_space" and rest:
        return check_set_key(rest)
    if key.startswith("base.set.") and len(key) > len("base.set."):
        return check_set_key(key[len("base.set."):])
    if head in SweepFile.model_fields:
        return check_set_key(key, SweepFile)
    return check_set_key(key)


def check_preset(name: str) -> str | None:
    if _PLACEHOLDER.match(name) or name in PRESETS:
        return None
    return f"unknown preset {name!r} (presets: {', '.join(PRESETS)})"


def set_items(ns: argparse.Namespace) -> list[str]:
    return list(getattr(ns, "set", None) or [])


def preset_names(argv: list[str]) -> list[str]:
    """The values given to --preset and --presets in ``argv``."""
    names, taking = [], None
    for tok in argv:
        if tok.startswith("-"):
            flag, _, value = tok.partition("=")
            taking = flag if flag in ("--preset", "--presets") else None
            if taking and value:
                names.append(value)
                taking = None if flag == "--preset" else taking
        elif taking:
            names.append(tok)
            taking = None if taking == "--preset" else taking
    return names


def check_set_item(item: str, ns: argparse.Namespace) -> str | None:
    """One ``--set KEY=VALUE`` of a parsed command."""
    if "=" not in item:
        return f"--set {item}: expected KEY=VALUE"
    key = item.split("=", 1)[0]
    if getattr(ns, "bench", None) == "quality" and ":" in key:  # PRESET:KEY=VALUE
        preset, key = key.split(":", 1)
        if (msg := check_preset(preset)) is not None:
            return f"--set {item}: {msg}"
    check = check_tune_set_key if getattr(ns, "command", None) == "tune" else check_set_key
    msg = check(key)
    return None if msg is None else f"--set {msg}"


# `td3.py`, `metrics.jsonl`: file names that look like keys.
_FILE_TYPES = {"py", "json", "jsonl", "yaml", "yml", "md", "png", "gif", "npz", "pt", "txt"}
_KEY_SPAN = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(=\S*)?$")


def config_keys(text: str) -> list[tuple[int, str]]:
    """Config keys named in inline code outside command lines: a span that is
    ``section.key``, ``key=value`` or ``--set key=value ...``, whose first
    part is a top-level config field (so `dotted.key=value` is left alone)."""
    keys = []
    for line, span in inline_code(text):
        items = re.findall(r"--set[ =](\S+)", span) if span.startswith("--set") else [span]
        for item in items:
            m = _KEY_SPAN.match(item)
            if not m or not (m.group(2) or "." in m.group(1)):
                continue
            parts = m.group(1).split(".")
            if parts[0] in ExperimentConfig.model_fields and parts[-1] not in _FILE_TYPES:
                keys.append((line, m.group(1)))
    return keys


def set_key_problems(text: str) -> list[Problem]:
    """Unknown ``--set`` keys and ``--preset`` names in the command lines, and
    unknown config keys in inline code."""
    problems = [(line, msg) for line, key in config_keys(text)
                if (msg := check_set_key(key)) is not None]
    for line, command, inline in command_lines(text):
        parsed, _, _ = parse_command(command, inline)
        found: list[str] = []
        for argv, ns in parsed:
            found += [check_set_item(item, ns) for item in set_items(ns)]
            found += [check_preset(name) for name in preset_names(argv)]
        problems += [(line, msg) for msg in dict.fromkeys(found) if msg is not None]
    return problems


# -- the tests on the real docs ---------------------------------------------------------


def _report(check, docs=DOCS) -> list[str]:
    return [f"{doc.relative_to(ROOT)}:{line}: {msg}"
            for doc in docs for line, msg in sorted(check(doc))]


def _fail_message(what: str, problems: list[str]) -> str:
    return f"{what} in the docs ({len(problems)}):\n" + "\n".join(problems)


def test_links_resolve():
    problems = _report(lambda doc: link_problems(doc.read_text(), doc.parent))
    assert not problems, _fail_message("broken links", problems)


def test_repository_paths_exist():
    problems = _report(lambda doc: path_problems(doc.read_text()), GUIDES)
    assert not problems, _fail_message("missing paths", problems)


def test_module_names_exist():
    problems = _report(lambda doc: module_problems(doc.read_text()), GUIDES)
    assert not problems, _fail_message("missing modules or attributes", problems)


def test_command_lines_parse():
    problems = _report(lambda doc: command_problems(doc.read_text()))
    assert not problems, _fail_message("command lines the CLI rejects", problems)


def test_set_keys_and_presets_exist():
    problems = _report(lambda doc: set_key_problems(doc.read_text()))
    assert not problems, _fail_message("unknown --set keys or presets", problems)


def test_the_checks_see_the_real_docs():
    """The checks above cannot pass vacuously: they find what the docs hold."""
    texts = [doc.read_text() for doc in DOCS]
    assert len(DOCS) >= 10
    assert sum(len(find_links(t)) for t in texts) >= 10
    assert sum(len(path_tokens(t)) for t in texts) >= 10
    assert sum(len(module_names(t)) for t in texts) >= 2
    commands = [(c, inline) for t in texts for _, c, inline in command_lines(t)]
    assert len(commands) >= 20
    parsed = [p for c, inline in commands for p in parse_command(c, inline)[0]]
    assert len(parsed) >= 20
    assert sum(len(set_items(ns)) for _, ns in parsed) >= 10
    assert sum(len(preset_names(argv)) for argv, _ in parsed) >= 5
    assert sum(len(config_keys(t)) for t in texts) >= 20
    assert sum(len(make_commands(t)) for t in texts) >= 3
    skipped = [n for c, inline in commands for n in parse_command(c, inline)[2]
               if n.startswith("not checked")]
    assert len(skipped) <= len(commands) // 10, skipped
    assert {"README.md", "docs", "dqd_ray", "tests", "Makefile"} <= set(repo_roots())
    assert ".venv" not in repo_roots()


# -- each checker can fail --------------------------------------------------------------

_BROKEN = """# Title

Intro with [a good link](README.md) and [a broken one](docs/no_such_page.md),
an [anchor](README.md#no-such-heading), [web](https://example.org/x) and [self](#title).

Run `dqd-ray run --no-such-flag` or `dqd-ray run --preset no_such_preset`, see
`tests/no_such_test.py`, `dqd_ray/config.py` and `dqd_ray.config.NoSuchThing`.
Settings: `resources.no_such_timeout`, `td3.lr`, `td3.py` and `--set dotted.key=value`.

```bash
$ dqd-ray run --preset cma_mega_td3 \\
    --set td3.no_such_field=1   # an unknown key
dqd-ray render RUN_DIR [--elite best|random | --measures 0.5,0.5] [--steps N]
dqd-ray bench faults [--scenario nodes|no_such_scenario]
.venv/bin/dqd-ray config --set algorithm.iso_sigma=0.01 --set algorithm.nope=1 > out.yaml
make no-such-target
```
"""


def test_link_check_reports_a_broken_link_and_anchor():
    problems = link_problems(_BROKEN, ROOT)
    assert [line for line, _ in problems] == [3, 4]
    assert "docs/no_such_page.md does not exist" in problems[0][1]
    assert "no heading with that anchor in README.md" in problems[1][1]
    assert link_problems("[x](#nowhere)\n", ROOT)[0][1].startswith("link #nowhere")


def test_path_check_reports_a_missing_path():
    assert path_problems(_BROKEN) == [(7, "tests/no_such_test.py: no such file or directory")]
    assert check_path("cluster/*.yaml") is None
    assert check_path("cluster/*.nope") is not None
    assert path_tokens("`runs/x/config.yaml` `RUN_DIR/x` `docs/<page>.md` `docs/...`") == []


def test_module_check_reports_a_missing_name():
    assert module_problems(_BROKEN) == [
        (7, "dqd_ray.config.NoSuchThing: dqd_ray.config has no attribute 'NoSuchThing'")]
    assert check_module("dqd_ray.config.ExperimentConfig.model_fields") is None
    assert check_module("dqd_ray.no_such") == "dqd_ray.no_such: dqd_ray has no attribute 'no_such'"
    assert check_module("no_such_package.x") == "no_such_package.x: no such module"


def test_command_check_reports_a_rejected_command():
    commands = command_lines(_BROKEN)
    assert [(line, inline) for line, _, inline in commands] == [
        (11, False), (13, False), (14, False), (15, False), (6, True), (6, True)]
    problems = command_problems(_BROKEN)
    assert sorted(line for line, _ in problems) == [6, 14, 16]
    messages = " ".join(msg for _, msg in problems)
    assert "unrecognized arguments: --no-such-flag" in messages
    assert "invalid choice: 'no_such_scenario'" in messages
    assert "no target 'no-such-target'" in messages
    # the synopsis is parsed once per alternative, placeholders filled in
    variants, notes = argv_variants("render RUN_DIR [--elite best|random | --measures 0.5] "
                                    "[--steps N] [--seed ...] # a comment | not a pipe")
    assert variants == [["render", "RUN_DIR", "--elite", "best", "--steps", "1"],
                        ["render", "RUN_DIR", "--elite", "random", "--steps", "1"],
                        ["render", "RUN_DIR", "--measures", "0.5", "--steps", "1"]]
    assert notes == ["left out [--seed ...]"]
    assert command_problems("`dqd-ray bench` and `dqd-ray render --steps 2`\n") == []
    with pytest.raises(Unparseable):
        argv_variants("bench faults --scenario ...")
    assert "cannot be split" in command_problems("`dqd-ray run --set 'x=1`\n")[0][1]


def test_set_key_check_reports_unknown_keys_and_presets():
    assert config_keys(_BROKEN) == [(8, "resources.no_such_timeout"), (8, "td3.lr")]
    problems = set_key_problems(_BROKEN)
    assert [line for line, _ in problems] == [8, 11, 15, 6]
    assert problems[0][1].startswith("resources.no_such_timeout: no setting 'no_such_timeout'")
    assert problems[1][1].startswith("--set td3.no_such_field: no setting 'no_such_field' at td3")
    assert "no setting 'nope' at algorithm" in problems[2][1]
    assert "unknown preset 'no_such_preset'" in problems[3][1]
    assert check_set_key("td3.no_such_field") is not None
    assert check_set_key("td3.batch_size") is None
    assert check_set_key("td3.batch_size.more") is not None
    assert check_set_key("algorithm.iso_sigma") is None  # pga_me's
    assert check_set_key("algorithm.num_pairs") is None  # me_es's
    assert check_set_key("resources.call_timeout_s") is None


def test_tune_set_key_check_knows_the_sweep_file():
    assert check_tune_set_key("tune_config.scheduler.grace_period") is None
    assert check_tune_set_key("param_space.td3.lr") is None
    assert check_tune_set_key("tune_config.no_such") is not None
    assert check_tune_set_key("no_such") is not None
    from dqd_ray.sweeps.file import SweepFile

    assert check_set_key("base.set.iterations", SweepFile) is None  # a dict: one level free
    assert check_set_key("base.set.td3.lr", SweepFile) is not None
