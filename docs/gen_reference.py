"""Generate the API reference: one page per public module of ``rh_trl`` (its docstrings, through mkdocstrings), and
the navigation of those pages. Run by the ``gen-files`` plugin at every ``mkdocs build``."""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rh_trl"
#: modules left out of the reference: the test helpers, and entry points with nothing to document beyond the CLI
SKIP = {("rh_trl", "testing"), ("rh_trl", "cli", "__main__")}

nav = mkdocs_gen_files.Nav()
for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if any(parts[: len(skip)] == skip for skip in SKIP) or any(p.startswith("_") for p in parts[1:]):
        continue
    page = Path("reference", *parts).with_suffix(".md")
    nav[parts] = page.relative_to("reference").as_posix()
    with mkdocs_gen_files.open(page, "w") as out:
        out.write(f"::: {'.'.join(parts)}\n")
    mkdocs_gen_files.set_edit_path(page, path.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as out:
    out.writelines(nav.build_literate_nav())
