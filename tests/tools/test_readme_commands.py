"""The commands the documentation shows are commands that work: a renamed option or module fails here, not a user.

Every shell command in a fenced code block (```bash, ```sh, ```shell, ```console or a bare ```) of
README.md, deploy/README.md and docs/*.md, and every inline `code span` of the two READMEs that is a whole
command (not a template with ``...``, ``|``, ``[ ]`` or ``< >``), is checked if it names a project entry point:

* ``make TARGET``: the Makefile has the target;
* ``kbvq-quantize|kbvq-serve|kbvq-eval ...`` (bare or ``.venv/bin/``): [project.scripts] has it, and its
  parser accepts the options;
* ``python -m MODULE ...`` and ``python benchmarks/SCRIPT.py ...`` (any ``python``/``.venv/bin/python``):
  the module or script exists and its parser accepts the options;
* ``vllm serve CKPT ...`` and kbvq-serve's vLLM options: vLLM's own server parser accepts them.

Only argument parsing runs: ``argparse.ArgumentParser.parse_args`` / ``parse_known_args`` are patched to
raise :class:`_Parsed` after a successful parse, so the entry point stops there (a parse error is argparse's
``SystemExit(2)`` with its message). Placeholder paths are fine: nothing reads them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_INFO = {"", "bash", "sh", "shell", "console", "shell-session"}


def _console_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed distribution's, which pip wrote from the same table
        from importlib.metadata import distribution

        return {ep.name: ep.value for ep in distribution("vllm-kbvq").entry_points if ep.group == "console_scripts"}
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


SCRIPTS = _console_scripts()
PYTHON = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line of the command's first line
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


# -- finding the commands ------------------------------------------------------------------------

def _words(text: str) -> list[list[str]]:
    """The simple commands of one shell line (comments dropped, split at ; && || |), without env prefixes."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote: not a command line
        return []
    commands, cur = [], []
    for t in [*tokens, ";"]:
        if t in SEPARATORS:
            commands.append(cur)
            cur = []
        else:
            cur.append(t)
    out = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value cmd
            words = words[1:]
        if words:
            out.append(words)
    return out


def _fenced_lines(text: str):
    """(line number, text) of each command line in the shell code blocks, continuation lines joined."""
    fence, info, console, block = None, "", False, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", line)
        if fence is None:
            if m:
                fence, info, block = m.group(1), m.group(2).lower(), []
            continue
        if m and m.group(1).startswith(fence) and not line.strip()[len(m.group(1)):].strip():
            if info in SHELL_INFO:
                console = any(ln.lstrip().startswith("$ ") for _, ln in block)
                yield from _join(block, console)
            fence = None
            continue
        block.append((n, line))


def _join(block, console: bool):
    start, parts = None, []
    for n, line in block:
        s = line.strip()
        if not parts:
            if console:
                if not s.startswith("$ "):
                    continue  # output
                s = s[2:]
            start = n
        if s.endswith("\\") and not s.rstrip("\\").rstrip().startswith("#"):
            parts.append(s[:-1])
            continue
        parts.append(s)
        yield start, " ".join(parts)
        parts = []
    if parts:
        yield start, " ".join(parts)


def _inline_spans(text: str):
    """(line number, text) of inline code spans outside fenced blocks (a span may wrap across lines)."""
    masked, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1) if fence is None else None
            masked.append("")
        else:
            masked.append("" if fence else line)
    body = "\n".join(masked)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
        yield body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def _entry_point(words) -> bool:
    first = words[0].removeprefix(".venv/bin/")
    if first in ("make", "vllm") or first in SCRIPTS:
        return True
    return bool(PYTHON.match(first)) and len(words) > 1 and (words[1] == "-m" or words[1].endswith(".py"))


# a span that is a template, not a command: kbvq-serve CKPT [vLLM options], --method rtn|gptq ...
TEMPLATE = re.compile(r"\.\.\.|[|<>\[\]{}]")


def commands(text: str, name: str, inline: bool = True) -> list[Command]:
    """The entry-point commands of one markdown text (``name`` labels their places)."""
    found = []
    for n, line in _fenced_lines(text):
        found += [Command(f"{name}:{n}", tuple(w)) for w in _words(line) if _entry_point(w)]
    if inline:
        for n, span in _inline_spans(text):
            if TEMPLATE.search(span):
                continue
            words = _words(span)
            if len(words) == 1 and _entry_point(words[0]) and len(words[0]) > 1:
                found.append(Command(f"{name}:{n} (inline)", tuple(words[0])))
    return found


def doc_commands() -> list[Command]:
    out = []
    for path in DOCS:
        # inline spans only in the READMEs: docs/ name programs' options in spans (`kbvq-eval --server`)
        out += commands(path.read_text(), str(path.relative_to(REPO)), inline=path.name == "README.md")
    return out


# -- checking one --------------------------------------------------------------------------------

class _Parsed(Exception):
    """Raised by the patched argparse after a successful parse: the entry point stops there."""

    def __init__(self, parser, namespace, extra):
        super().__init__(parser.prog)
        self.parser, self.namespace, self.extra = parser, namespace, extra


@contextlib.contextmanager
def _parse_only(mp: pytest.MonkeyPatch):
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]  # parse_args calls parse_known_args, and subparsers call it again: only the outermost stops

    def patched_parse_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            ns = parse_args(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0]:
            return ns
        raise _Parsed(self, ns, [])

    def patched_parse_known_args(self, args=None, namespace=None):
        if depth[0]:
            return parse_known_args(self, args, namespace)
        depth[0] += 1
        try:
            ns, extra = parse_known_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise _Parsed(self, ns, extra)

    mp.setattr(argparse.ArgumentParser, "parse_args", patched_parse_args)
    mp.setattr(argparse.ArgumentParser, "parse_known_args", patched_parse_known_args)
    yield


_VLLM_PARSER = []


def _vllm_serve_parse(argv: list[str]):
    """vLLM's server parser (as ``vllm serve`` and kbvq-serve build it) on ``argv``; validated as vLLM does."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: its server options cannot be checked here")
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    from vllm_kbvq.serve import vllm_parser

    if not _VLLM_PARSER:
        _VLLM_PARSER.append(vllm_parser())
    args = _VLLM_PARSER[0].parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def _makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s:#=][^:=]*?)\s*::?(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def _run(mp: pytest.MonkeyPatch, argv0: str, call) -> tuple[object, str]:
    """Run ``call()`` with argv patched and parsing stopped; (outcome, its output). Outcome: a _Parsed,
    an exit status, or an exception raised before the parse."""
    out = io.StringIO()
    mp.setattr(sys, "argv", [argv0])
    with pytest.MonkeyPatch.context() as parse_mp, _parse_only(parse_mp), warnings.catch_warnings(), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        warnings.simplefilter("ignore")
        try:
            result = call()
        except _Parsed as p:
            return p, out.getvalue()
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code or 0, out.getvalue()
            return 1, f"{out.getvalue()}{e.code}"
        except Exception as e:  # noqa: BLE001 - reported as the command's problem
            return e, out.getvalue()
    return (result if isinstance(result, int) else 0), out.getvalue()


def problem(cmd: Command, mp: pytest.MonkeyPatch) -> str | None:
    """What is wrong with ``cmd`` (None: it names an existing entry point whose parser takes its options)."""
    words = list(cmd.words)
    first = words[0].removeprefix(".venv/bin/")
    args = words[1:]
    if first == "make":
        wanted = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = [t for t in wanted if t not in _makefile_targets()]
        return f"the Makefile has no target {', '.join(missing)}" if missing else None

    if first == "vllm":
        if args[:1] != ["serve"] or len(args) < 2 or args[1].startswith("-"):
            return "only `vllm serve MODEL [options]` is checked"
        argv = ["--model", args[1], *args[2:]]
        return _parsed_by_vllm(argv)

    if first in SCRIPTS:
        module, _, func = SCRIPTS[first].partition(":")
        if first == "kbvq-serve":
            return _serve_problem(args, mp)
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            return f"[project.scripts] {first} = {SCRIPTS[first]} does not load: {type(e).__name__}: {e}"

        def call():  # what the installed console script does: sys.exit(fn()) with sys.argv set
            sys.argv[1:] = args
            return fn()

        outcome, output = _run(mp, first, call)
    elif PYTHON.match(first) and args[:1] == ["-m"]:
        if len(args) < 2:
            return "python -m without a module"
        module, rest = args[1], args[2:]
        try:
            spec = importlib.util.find_spec(module)
        except ImportError as e:
            spec, why = None, str(e)
        else:
            why = ""
        if spec is None:
            return f"no module named {module}" + (f" ({why})" if why else "")
        if spec.submodule_search_locations is not None and importlib.util.find_spec(f"{module}.__main__") is None:
            return f"{module} is a package without __main__: python -m cannot run it"

        def call():
            sys.argv[1:] = rest
            return runpy.run_module(module, run_name="__main__", alter_sys=True)

        outcome, output = _run(mp, module, call)
    elif PYTHON.match(first) and args and args[0].endswith(".py"):
        script = REPO / args[0]
        if not script.is_file():
            return f"no script {args[0]} (relative to the repository root)"
        mp.syspath_prepend(str(script.parent))  # as `python script.py` puts its directory first

        def call():
            sys.argv[1:] = args[1:]
            return runpy.run_path(str(script), run_name="__main__")

        outcome, output = _run(mp, str(script), call)
    else:
        return "not an entry point this test knows"
    return _judge(outcome, output, cmd)


def _judge(outcome, output: str, cmd: Command) -> str | None:
    if isinstance(outcome, _Parsed):
        if outcome.extra:
            return f"unrecognized arguments: {' '.join(outcome.extra)}"
        return None
    wants_help = any(w in ("-h", "--help") for w in cmd.words)
    if outcome == 0 and wants_help:
        return None
    if isinstance(outcome, BaseException):
        return f"raised {type(outcome).__name__}: {outcome} before its arguments were parsed\n{output[-2000:]}"
    if outcome == 0:
        return "finished without parsing its arguments with argparse (this test cannot check it)"
    return f"exit status {outcome}:\n{output.strip()[-2000:]}"


def _parsed_by_vllm(argv: list[str]) -> str | None:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            _vllm_serve_parse(argv)
    except SystemExit as e:
        return f"vLLM's server parser refused it (exit status {e.code}):\n{out.getvalue().strip()[-2000:]}"
    except Exception as e:  # noqa: BLE001 - validate_parsed_serve_args raises TypeError/ValueError
        return f"vLLM refused its options: {type(e).__name__}: {e}"
    return None


def _serve_problem(args: list[str], mp: pytest.MonkeyPatch) -> str | None:
    """kbvq-serve parses its own options by hand and hands the rest to vLLM's parser: run its main up to
    there (its checkpoint checks skipped: the path may be a placeholder), then let vLLM's parser judge."""
    from vllm_kbvq import serve

    handed = []
    mp.setattr(serve, "check_startup", lambda model: None)
    mp.setattr(serve, "_run_server", lambda vllm_argv: handed.append(vllm_argv) or 0)
    mp.setattr(serve, "print_vllm_help", lambda keyword=None: 0)  # its own option; the help is tested elsewhere
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))  # main may set it
    outcome, output = _run(mp, "kbvq-serve", lambda: serve.main(args))
    if outcome != 0:
        return f"kbvq-serve refused it (exit status {outcome}):\n{output.strip()[-2000:]}"
    if not handed:
        return None  # --help / --help-vllm
    return _parsed_by_vllm(handed[0])


# -- the tests -----------------------------------------------------------------------------------

COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    assert {c.where.split(":")[0] for c in COMMANDS} >= {"README.md", "docs/performance.md", "docs/results.md"}
    firsts = {c.words[0].removeprefix(".venv/bin/") for c in COMMANDS}
    assert {"make", "kbvq-quantize", "kbvq-eval", "kbvq-serve", "vllm"} <= firsts, firsts
    assert any(c.words[:2] == ("python", "-m") for c in COMMANDS)
    assert any(c.words[1].startswith("benchmarks/") for c in COMMANDS if PYTHON.match(c.words[0]))


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {shlex.join(c.words)[:50]}" for c in COMMANDS])
def test_documented_command_parses(cmd, monkeypatch):
    found = problem(cmd, monkeypatch)
    if found is not None:
        pytest.fail(f"{cmd}\n{found}", pytrace=False)


BROKEN = """\
Some text, then:

```bash
kbvq-quantize --model m --output o \\
    --bitz 2            # a renamed option
python -m quantize_tools.no_such_module --x 1
make no-such-target
.venv/bin/python benchmarks/no_such_script.py
kbvq-eval --model m --seqlen 512 --limit 500 --output eval.json   # fine
kbvq-serve out/ckpt --port 8000 --no-such-vllm-option 1
kbvq-serve --port 8000 out/ckpt
```

```python
kbvq-quantize --this-is-python-not-shell
```

Inline: `python -m quantize_tools.testbed.demo --perplexity two` and `kbvq-serve CKPT [vLLM options]` (a template).
"""


def test_the_checker_reports_broken_commands(monkeypatch):
    found = commands(BROKEN, "BROKEN.md")
    assert [c.where for c in found] == ["BROKEN.md:4", "BROKEN.md:6", "BROKEN.md:7", "BROKEN.md:8", "BROKEN.md:9",
                                        "BROKEN.md:10", "BROKEN.md:11", "BROKEN.md:18 (inline)"]
    assert found[0].words == ("kbvq-quantize", "--model", "m", "--output", "o", "--bitz", "2")
    got = {c.where: problem(c, monkeypatch) for c in found}
    assert "unrecognized arguments: --bitz 2" in got["BROKEN.md:4"], got["BROKEN.md:4"]
    assert "no module named quantize_tools.no_such_module" in got["BROKEN.md:6"]
    assert "no target no-such-target" in got["BROKEN.md:7"]
    assert "no script benchmarks/no_such_script.py" in got["BROKEN.md:8"]
    assert got["BROKEN.md:9"] is None
    assert "--perplexity" in got["BROKEN.md:18 (inline)"] and "two" in got["BROKEN.md:18 (inline)"]
    assert "CKPT comes first" in got["BROKEN.md:11"]
    if importlib.util.find_spec("vllm") is not None:
        assert "--no-such-vllm-option" in got["BROKEN.md:10"], got["BROKEN.md:10"]
