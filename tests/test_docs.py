"""The documentation site: `mkdocs build --strict` passes, so every internal link and
anchor resolves and every page is in the nav; the same build fails on a planted broken
link, a planted missing anchor and a page left out of the nav; every stage's page starts
with the command that runs it; the README stays a five-minute read whose links land."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"

# One page per stage (and per synthetic pipeline, training topic and eval suite). Each
# starts, right under its title, with a code block whose first command runs the stage.
STAGE_PAGES = [
    "stages/teacher.md",
    "stages/generate.md",
    *(f"stages/pipelines/{p}.md" for p in ("table_qa", "doc_qa", "needle", "chat", "tool_use", "steerability")),
    "stages/dedup.md",
    "stages/review.md",
    "stages/mix.md",
    *(f"stages/train/{p}.md" for p in ("index", "lora", "distributed", "packing", "activation-loss")),
    "stages/prefs.md",
    "stages/dpo.md",
    "stages/grpo.md",
    "stages/audit.md",
    *(f"stages/eval/{p}.md" for p in ("index", "retention", "tool-calls", "ifeval")),
    "stages/gate.md",
    "stages/export.md",
    "stages/plots.md",
    "stages/summary.md",
]
# What a stage's first command may start with: the CLI, make, DVC, or a launcher that
# runs the CLI on several processes.
COMMANDS = ("posttrain ", "make ", "dvc ", "torchrun ", "deepspeed ", "accelerate launch ")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # No -q: quiet mode drops the warnings that --strict counts, and the build passes.
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def nav_pages(nav) -> list[str]:
    """Every page path named in the nav, however deeply nested."""
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return [p for item in nav for p in nav_pages(item)]


def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_site_builds_strict_every_link_and_anchor_resolving(tmp_path):
    result = mkdocs_build(CONFIG, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "stages" / "gate" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    in_nav = nav_pages(config()["nav"])
    assert sorted(pages - set(in_nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(in_nav) - pages) == [], "nav entries with no page"
    assert len(in_nav) == len(set(in_nav)), "a page is in the nav twice"


def test_a_planted_broken_link_missing_anchor_and_orphan_page_fail_the_build(tmp_path):
    """The strictness itself: the same config on a copy of the docs with three faults
    planted. (The built-in theme: link checks do not depend on the theme, and it is
    faster.)"""
    shutil.copytree(DOCS, tmp_path / "docs")
    gate = tmp_path / "docs" / "stages" / "gate.md"
    gate.write_text(gate.read_text() + "\n[a](no-such-page.md) [b](audit.md#no-such-heading)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    cfg = config() | {"theme": {"name": "mkdocs"}, "docs_dir": str(tmp_path / "docs")}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))

    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "no-such-page.md" in out and "#no-such-heading" in out and "orphan.md" in out, out


def first_code_block(text: str) -> tuple[int, list[str]]:
    """(line index of the opening fence, the block's lines) of the first fenced block."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return start, lines[start + 1:end]


def test_every_stage_page_starts_with_the_command_that_runs_it():
    for page in STAGE_PAGES:
        text = (DOCS / page).read_text()
        lines = text.splitlines()
        assert lines[0].startswith("# "), f"{page}: no title on the first line"
        start, block = first_code_block(text)
        between = [line for line in lines[1:start] if line.strip()]
        assert not between, f"{page}: the command block must come right under the title, not after {between[:1]}"
        commands = [line.strip() for line in block
                    if line.strip() and not line.lstrip().startswith(("#", "export "))]
        assert commands and commands[0].startswith(COMMANDS), f"{page}: first command {commands[:1]}"
        assert any("posttrain " in c or "posttrain.cli" in c or c.startswith(("make ", "dvc ")) for c in commands), (
            f"{page}: the block does not run a stage")


def test_the_readme_is_short_names_the_two_commands_and_its_doc_links_land():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    assert "make run" in readme and "make test" in readme
    assert "<!-- results: filled by the proof run -->" in readme
    links = re.findall(r"\]\((docs/[^)\s]+)\)", readme)
    assert len(links) >= len(STAGE_PAGES)
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README links {link}: no such file"
        if anchor:
            headings = [slugify(h.strip(), "-") for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)]
            assert anchor in headings, f"README links {link}: no such heading in {path}"
    for page in STAGE_PAGES:
        assert f"(docs/{page})" in readme, f"README does not link {page}"
