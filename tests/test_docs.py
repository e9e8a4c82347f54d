"""The documentation: a short README, links that resolve, a current configs page, the two commands.

Fast: nothing trains. docs/configs.md is compared with what docs/make_configs_page.py would write now.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# [text](target) and ![alt](target); the target stops at whitespace or ')' (an optional "title" follows).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_anchor(CODE_SPAN.sub(lambda m: m.group(0).strip("`"), h)) for h in HEADING.findall(text)}


def _relative_links(path: Path) -> list[str]:
    targets = LINK.findall(_prose(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def _make_configs_page():
    spec = importlib.util.spec_from_file_location("make_configs_page", DOCS / "make_configs_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        lines += [line.strip() for line in block.splitlines()]
    return lines


def test_readme_is_a_short_front_page():
    n = len(README.read_text().splitlines())
    assert n < 250, f"README.md has {n} lines; move detail into docs/ (fewer than 250)."


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in _relative_links(page):
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_pages_link_to_each_other():
    """Every docs page is linked from the README, so none is orphaned."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _relative_links(README) if t.partition("#")[0]}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links to no {missing}"


def test_configs_page_is_up_to_date():
    page = _make_configs_page()
    expected = page.render()
    assert (DOCS / "configs.md").read_text() == expected, page.OUT_OF_DATE


def test_configs_page_check_flag(tmp_path, monkeypatch, capsys):
    page = _make_configs_page()
    assert page.main(["--check"]) == 0
    stale = tmp_path / "configs.md"
    stale.write_text("# stale\n")
    monkeypatch.setattr(page, "OUT", stale)
    assert page.main(["--check"]) == 1
    assert capsys.readouterr().err.strip() == page.OUT_OF_DATE
    assert page.main([]) == 0 and stale.read_text() == page.render()
    assert [p.name for p in tmp_path.iterdir()] == ["configs.md"]  # the temporary file was renamed away


def test_configs_page_lists_every_config_with_its_arguments():
    page = _make_configs_page()
    text = (DOCS / "configs.md").read_text()
    for path in page.config_files():
        assert f"## configs/{path.name}" in text
    assert page.arguments(ROOT / "configs" / "paper.py") == dict(
        demo=False, small=False, science=False, blackbox=False, model="vgg16"
    )
    assert "variant = 'paper'" in text  # get_config() with no argument is the paper's variant


def test_the_readme_commands():
    lines = _bash_lines(README.read_text())
    tests = [line for line in lines if "ruff check . && python -m pytest" in line]
    demo = [line for line in lines if "python train.py --config configs/paper.py:demo" in line]
    assert tests, "README.md's bash blocks lack the test command (ruff check . && python -m pytest)."
    assert demo, "README.md's bash blocks lack the demo (python train.py --config configs/paper.py:demo)."


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_unfilled_placeholder(page):
    """Drafts mark a number still to measure as <LIKE_THIS>; a page that ships holds the measured number."""
    import re

    left = re.findall(r"<[A-Z][A-Z0-9_]+>", page.read_text())
    assert not left, f"{page.relative_to(ROOT)} still holds the placeholders {left}"
