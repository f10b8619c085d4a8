"""The README's examples still work: every ```bash and ```python block is read from README.md, the cheap
commands run for real, and the expensive ones (training) are checked as far as they can be without
training: the same flags must resolve to a config, an experiment must plan its runs (--dry-run), and the
command and its --help must exist. A README command that no longer exists fails here."""
from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

import randteach
from randteach.cli import build_parser, main
from randteach.config import build_config

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("--dry-run", "--help", "--keys", "--list-presets")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks as argv (continuation lines joined, comments cut)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def test_the_readme_has_examples():
    names = [argv[0] for argv in commands()]
    assert "randteach" in names and "make" in names and blocks("python")


@pytest.mark.parametrize("argv", [a for a in commands() if a[0] == "make"], ids=shlex.join)
def test_make_targets_exist(argv):
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(argv[1:]) <= targets, f"`{shlex.join(argv)}`: the Makefile has no such target"


def _typed(text: str):
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value  # YAML reads 3e-4 as text
    except ValueError:
        return value


def _run(args: list[str], capsys) -> str:
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, f"`randteach {shlex.join(args)}` exited {rc}: {out.err}"
    return out.out


@pytest.mark.parametrize("argv", [a for a in commands() if a[0] == "randteach"], ids=shlex.join)
def test_randteach_commands_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a command writes stays in the test's folder
    args = argv[1:]
    command = args[0]
    with pytest.raises(SystemExit) as e:  # the command exists and documents itself
        main([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: randteach " + command)
    if command == "config" or any(flag in args for flag in CHEAP):
        assert _run(args, capsys).strip()
    elif command == "distill":  # training: the same flags must resolve to a config
        resolved = yaml.safe_load(_run(["config", *args[1:]], capsys))
        for key, value in zip(args[1::2], args[2::2]):
            if key.startswith("--") and "." in key:
                section, field = key[2:].split(".")
                assert resolved[section][field] == _typed(value), f"{key} {value} did not reach the config"
    elif command == "experiment":  # running it trains: plan its runs instead
        assert "run" in _run([*args, "--dry-run"], capsys)
    else:
        _, extra = build_parser().parse_known_args(args)
        assert all(a.startswith("--") and "." in a for a in extra[::2]), f"unknown arguments {extra}"


def _randteach_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "randteach"):
            yield node


@pytest.mark.parametrize("code", blocks("python"))
def test_python_examples_bind_and_resolve(code):
    """Each `randteach.f(...)` call of a Python example names a public function whose signature takes
    its arguments; a distillation's preset and keys resolve to a config (running it would train)."""
    tree = ast.parse(code)
    calls = list(_randteach_calls(tree))
    assert calls, "the example calls nothing from randteach"
    for call in calls:
        name = call.func.attr
        assert name in randteach.__all__, f"randteach.{name} is not part of the public API"
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {}
        for kw in call.keywords:
            kwargs.update(ast.literal_eval(kw.value) if kw.arg is None else {kw.arg: ast.literal_eval(kw.value)})
        bound = inspect.signature(getattr(randteach, name)).bind(*args, **kwargs)
        if name == "distill":
            overrides = bound.arguments.get("overrides", {})
            cfg = build_config(bound.arguments.get("preset"), None, overrides)
            for key, value in overrides.items():
                section, field = key.split(".")
                assert getattr(getattr(cfg, section), field) == value
