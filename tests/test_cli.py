"""The command line as a whole: every option documented, every command with an example, shared options alike."""

from __future__ import annotations

import click

from komt_edge.cli import cli


def _commands(group: click.Group, prefix: str = "komt-edge"):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_every_option_has_help_and_every_command_an_example():
    missing = [f"{path} {p.opts[0]}" for path, cmd in _commands(cli) for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help: {missing}"
    no_example = [path for path, cmd in _commands(cli) if "Example" not in (cmd.help or "")]
    assert not no_example, f"commands without an example: {no_example}"


def test_shared_options_have_one_syntax_everywhere():
    """A flag letter or name means one thing: -r is --repetitions, -t is an integer thread count, -q/--quants
    is the output types, --json takes an optional file, --template offers auto/llama/mistral."""
    seen: dict[str, tuple[str, str]] = {}
    for path, cmd in _commands(cli):
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            for opt in p.opts + p.secondary_opts:
                kind = (p.name, type(p.type).__name__)
                if opt in ("-h", "--help"):
                    continue
                if opt in seen and seen[opt][0] != kind[0]:
                    raise AssertionError(f"{opt} is {seen[opt]} in one command and {kind} in {path}")
                seen.setdefault(opt, kind)
    assert seen["-t"] == ("n_threads", "IntRange")
    assert seen["-r"][0] == "repetitions"
    assert seen["--quants"][0] == seen["-q"][0] == "quants"
    templates = {tuple(p.type.choices) for _, cmd in _commands(cli) for p in cmd.params if p.name == "template"}
    assert all(t[:3] == ("auto", "llama", "mistral") for t in templates), templates
