"""The documents the project points users at are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from fastckpt.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def test_readme_links_resolve_inside_the_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/STORIES.md" in local
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT) and target.exists(), link
    assert "shared/" not in text and "SCENARIOS.md" not in text


def test_stories_hold_the_stories_the_tests_name():
    stories = (ROOT / "docs" / "STORIES.md").read_text(encoding="utf-8")
    titles = re.findall(r"^## (\d+)\. ", stories, flags=re.M)
    assert titles == [str(i) for i in range(1, len(titles) + 1)] and len(titles) >= 4
    assert "DeltaLM" in stories  # story 1, played by the demo and tests/test_rules_deltalm.py
    for path in ROOT.glob("fastckpt/**/*.py"):
        assert "SCENARIOS.md" not in path.read_text(encoding="utf-8"), path


def test_demo_points_at_the_stories_file():
    result = CliRunner().invoke(app, ["demo", "--no-bench"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("The stories in full")
    assert Path(last.split(": ", 1)[1]) == ROOT / "docs" / "STORIES.md"
