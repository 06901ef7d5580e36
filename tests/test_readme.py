"""The README's quick start and CI must not drift apart."""

import re

from tests.conftest import ROOT


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    run, test = quick_start_commands()
    assert "scrm init" in run and "scrm run" in run
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
    assert test in ci
