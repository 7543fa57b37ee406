"""CI (.ci/run) must run the README's own install and test commands, so what CI proves is what
a new user does."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    quick_start = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    commands = quick_start.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = [line.strip() for line in REPO.joinpath(".ci", "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    install, test = commands[0], commands[-1]
    assert test == "python3 -m pytest -q tests" == ci[-1]
    assert install in ci and ci.index(install) == len(ci) - 2
