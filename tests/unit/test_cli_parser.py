"""The CLI builds only the parser of the verb it runs (engine/cli/__init__.py): it must
parse every command line exactly as the full parser does, and fall back to the full
parser where the command line names no verb it knows."""

from __future__ import annotations

import argparse

import pytest

from engine import cli
from engine.commandline import CommandLineError

LINES = [
    ["forget", "/s", "--all", "--keep-daily", "7", "--tz", "UTC", "--gc", "--json"],
    ["--json", "-v", "gc", "/s", "--max-unused", "10%"],
    ["--log-file", "forget", "gc", "/s", "--dry-run"],  # a log file called like a verb
    ["--log-file=/tmp/x.log", "-q", "backup", "/s", "disk.img", "--disk", "d"],
    ["files", "ls", "/s", "d@1", "/etc"],
    ["vsphere", "list", "/s"],
    ["rebuild-index", "/s", "--config"],
    ["protect", "/s", "d@1", "--vm"],
]


def _full(argv):
    p, sub = cli._top_parser()
    cli._register(sub)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv", LINES, ids=lambda a: " ".join(a))
def test_the_verbs_parser_alone_parses_as_the_full_one(argv):
    only = cli.build_parser(argv)
    assert len(only._subparsers._group_actions[0].choices) == 1  # one verb's parser was built
    assert vars(only.parse_args(argv)) == vars(_full(argv))


@pytest.mark.parametrize("argv", [["frob", "/s"], ["--json"], ["-v", "--log-file", "x"], []])
def test_what_names_no_verb_gets_the_full_parser(argv):
    p = cli.build_parser(argv)
    choices = p._subparsers._group_actions[0].choices
    assert {"init", "backup", "forget", "gc", "vsphere", "files"} <= set(choices)
    with pytest.raises(CommandLineError):
        p.parse_args(argv)


def test_version_is_read_only_when_asked(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "version", lambda: calls.append(1) or "9.9")
    cli.build_parser(["gc", "/s"]).parse_args(["gc", "/s"])
    assert calls == []
    with pytest.raises(SystemExit):
        cli.build_parser(["--version"]).parse_args(["--version"])
    assert calls == [1] and capsys.readouterr().out == "blockvault 9.9\n"


def test_a_usage_error_inside_the_verb_is_still_the_verbs(capsys):
    with pytest.raises(CommandLineError) as e:
        cli.build_parser(["gc", "/s", "--max-unused"]).parse_args(["gc", "/s", "--max-unused"])
    assert e.value.parser.prog == "blockvault gc"
    assert isinstance(e.value.parser, argparse.ArgumentParser)
