"""README.md and docs/*.md: README stays short with a table of contents, its first screen keeps the two commands,
every relative link (and #anchor, by GitHub's slug rules) points to a file and heading that exist, and every tool
they run is one, which answers --help."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text without fenced code blocks (bash comments there start with '#') and inline code spans."""
    lines = []
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' removed, spaces to '-'."""
    heading = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen = {}
    found = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def links(path):
    return [target for line in prose(path.read_text()) for target in LINK.findall(line)]


def test_slug_follows_githubs_rules():
    assert slug("CLIP (`clip_model.py`)") == "clip-clip_modelpy"
    assert slug("What prompts do: `analyze.py`") == "what-prompts-do-analyzepy"
    assert slug("Use a method in your own project") == "use-a-method-in-your-own-project"


def test_readme_is_short_with_a_table_of_contents():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    contents = text[text.index("\n## Contents\n") + 1:]
    contents = contents[:contents.index("\n## ")]
    listed = [target[1:] for target in LINK.findall(contents) if target.startswith("#")]
    sections = [slug(line[3:]) for line in prose(text) if line.startswith("## ") and line != "## Contents"]
    assert listed == sections  # every section, in README's order, and nothing that is not a heading there


def test_readme_first_screen_keeps_the_demo_and_the_ci_test_command():
    first_screen = README.read_text().splitlines()[:30]
    assert "python train.py --method coop --data demo --backbone tiny --epochs 50" in first_screen
    test_command = "pip install -r requirements-dev.txt && python -m pytest"
    assert test_command in first_screen
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()  # CI runs exactly README's command


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    assert set(PAGES[1:]) <= linked


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    checked = 0
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} names no file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: {target} names no heading of {file.name}"
        checked += 1
    assert checked  # every page links somewhere (docs pages back to README)


TOOLS = sorted(path.stem for path in ROOT.glob("*.py") if 'if __name__ == "__main__":' in path.read_text())


def test_the_docs_run_every_tool_and_only_tools():
    named = {name for page in PAGES for name in re.findall(r"python (\w+)\.py", page.read_text())}
    assert named == set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_parses_its_arguments(tool, capsys):
    """In this process (a --help builds the tool's whole parser), so the quick tier reaches every tool."""
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(tool).main(["--help"])
    assert exit.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: ") and "--help" in usage
