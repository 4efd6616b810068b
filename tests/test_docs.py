"""The README is the front page and docs/ the manual: what they promise is checked here.

README.md stays short (at most 250 lines) with the quick start in its first 80 lines; the two set-up
commands are the scripts that exist; every link from the README or a docs page to a file of the
repository resolves, anchors included (GitHub's heading slugs); the families table, the command list
and the pipelines page name what the code registers.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings inside code blocks
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _local_links(path: Path) -> list:
    """``(target file, anchor or None)`` for every link in ``path`` that is not a URL."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        out.append(((path.parent / file).resolve() if file else path, anchor or None))
    return out


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    first = "\n".join(lines[:80])
    assert "\n## Quick start\n" in first
    quick = _section(README.read_text(), "## Quick start")
    assert quick in first, "the whole quick start must sit in the first 80 lines"
    assert len([line for line in quick.splitlines() if line.strip() and not line.startswith("```")]) <= 20
    for call in ("trifuse.from_pretrained(", ".generate(", "trifuse.pipeline(", "trifuse serve ", "trifuse export ",
                 "trifuse verify ", "trifuse bench"):
        assert call in quick, call
    # The two set-up commands, as CI and users run them, and the scripts behind them.
    for script in ("run.sh", "test.sh"):
        assert f"\nbash scripts/{script} " in first and (ROOT / "scripts" / script).is_file(), script


@pytest.mark.parametrize("page", [README, ROOT / "CHANGELOG.md", *DOCS], ids=lambda p: p.name)
def test_every_link_resolves(page):
    links = _local_links(page)
    if page == README:
        docs_links = [f for f, _ in links if "docs" in f.relative_to(ROOT).parts]
        assert {f.name for f in docs_links} >= {p.name for p in DOCS}, "the README links every docs page"
    for target, anchor in links:
        assert target.exists(), f"{page.name} links {target.relative_to(ROOT)}, which does not exist"
        if anchor is not None:
            assert target.suffix == ".md" and anchor in _anchors(target), \
                f"{page.name} links {target.name}#{anchor}; its headings: {sorted(_anchors(target))}"


def test_the_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in DOCS:
        if page.name != "README.md":
            assert f"]({page.name})" in index, page.name


def test_front_page_names_what_the_code_registers():
    from trifuse.cli import build_parser
    from trifuse.engine.pipelines import ALIASES, TASKS
    from trifuse.engine.registry import families

    text = README.read_text()
    table = _section(text, "## Families and tasks")
    for fam in families():
        for t in fam.model_types:
            assert f"`{t}`" in table, t
    commands = build_parser()._subparsers._group_actions[0].choices
    listed = _section(text, "## The `trifuse` command")
    cli_page = (ROOT / "docs" / "cli.md").read_text()
    for name in commands:
        assert f"- `trifuse {name}" in listed and f"| `trifuse {name}" in cli_page, name
    pipelines = (ROOT / "docs" / "pipelines.md").read_text()
    for task in TASKS + tuple(ALIASES):
        assert f'"{task}' in pipelines or f"`{task}`" in pipelines, task


def test_benchmarks_page_lists_every_named_size():
    """`trifuse bench` points at docs/benchmarks.md for its named sizes: every one is there."""
    from trifuse.engine.registry import named_sizes

    text = (ROOT / "docs" / "benchmarks.md").read_text()
    missing = [name for name in named_sizes() if f"`{name}`" not in text]
    assert not missing, missing
