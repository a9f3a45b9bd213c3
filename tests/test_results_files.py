"""Every results page names the command that wrote it and the commit it ran at, and that command
exists with every flag it uses: a page whose command no longer runs cannot be regenerated."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*(ROOT / "analysis" / "results").glob("*.md"), *(ROOT / "docs" / "results").glob("*.md")])


def _commands(text: str) -> list[str]:
    return re.findall(r"(?:Command|Page written by): `([^`]+)`", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_results_page_names_its_command_and_commit(page):
    text = page.read_text(encoding="utf-8")
    assert "Command:" in text, f"{page} names no command"
    assert re.search(r"at commit [0-9a-f]{7,}", text), f"{page} names no commit"
    for command in _commands(text):
        check_command(command)


def check_command(command: str) -> None:
    from sabiscale.cli import parse

    argv = shlex.split(command)
    if argv[0].endswith("python") and argv[1] == "-m":
        module = argv[2]
        assert module.startswith("sabiscale_analysis."), command
        source = ROOT / "analysis" / f"{module.split('.', 1)[1]}.py"
        assert source.is_file(), f"{command}: {source} does not exist"
        text = source.read_text()
        for flag in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
            assert f'"{flag}"' in text, f"{command}: {source.name} has no flag {flag}"
    else:
        assert argv[0] == "sabiscale", command
        parse(argv[1:])  # argparse exits on an unknown subcommand or flag


def test_the_checker_catches_a_stale_command():
    with pytest.raises(AssertionError):
        check_command(".venv/bin/python -m sabiscale_analysis.exp_masked_descramble --no-such-flag 3")
    with pytest.raises(SystemExit):
        check_command("sabiscale plan launch/recipes/demo.yaml --no-such-flag")
