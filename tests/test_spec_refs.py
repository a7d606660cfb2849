"""Every "SPEC §N" in the repository resolves to a section of docs/spec.md, and the spec's
"Where each rule is implemented" table names files and functions that exist.

"SPEC" means docs/spec.md (its opening lines say so). A citation is any "§N" or "§N.M" on a
line that mentions SPEC or spec.md ("SPEC §2/§3" checks both); inside docs/spec.md every "§"
counts. "SPEC.md" names a file the repository does not have, so it is refused too."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
TABLE_TITLE = "Where each rule is implemented"

SOURCE_SUFFIXES = {".py", ".cc", ".h", ".cu", ".cuh", ".md", ".cmake", ".sh", ".toml", ".txt",
                   ".cfg", ".yml", ".yaml"}
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", "bench_out", ".venv",
             "venv", "_skbuild"}
SKIP_PATHS = {ROOT / "docs" / "bench"}  # recorded bench output, not prose

HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
SECTION_REF = re.compile(r"§\s*(\d+(?:\.\d+)*)")
MENTIONS_SPEC = re.compile(r"\bSPEC\b|spec\.md")
OLD_NAME = re.compile(r"\bSPEC\.md\b")


def spec_sections(text: str) -> set[str]:
    """Section numbers that have a heading ("## 3. Numerics", "### 2.1 Reduce-scatter")."""
    return {m.group(1) for line in text.splitlines() if (m := HEADING.match(line))}


def citations(text: str, every_line: bool = False) -> list[tuple[int, str]]:
    """(line number, section) of each citation in `text`."""
    found = []
    for n, line in enumerate(text.splitlines(), start=1):
        if every_line or MENTIONS_SPEC.search(line):
            found += [(n, m.group(1)) for m in SECTION_REF.finditer(line)]
    return found


def source_files():
    for top, dirs, files in os.walk(ROOT):
        here = Path(top)
        # Hidden folders other than .ci hold tool state or a developer's scratch copies
        # (old trees would fail the scan), never the repository's own sources.
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and here / d not in SKIP_PATHS and (d == ".ci" or not d.startswith(".")))
        for name in sorted(files):
            path = here / name
            if path.suffix in SOURCE_SUFFIXES or name == "CMakeLists.txt":
                yield path


def unresolved(text: str, sections: set[str], every_line: bool = False) -> list[str]:
    return [f"line {n}: §{s}" for n, s in citations(text, every_line) if s not in sections]


@pytest.fixture(scope="module")
def sections():
    assert SPEC.is_file(), "docs/spec.md is missing"
    found = spec_sections(SPEC.read_text(encoding="utf-8"))
    assert {"1", "2", "2.1", "2.2", "3", "4", "5", "6"} <= found, sorted(found)
    return found


def test_every_citation_resolves(sections):
    bad, total = [], 0
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        inside_spec = path == SPEC
        total += len(citations(text, inside_spec))
        bad += [f"{rel} {where}" for where in unresolved(text, sections, inside_spec)]
        if not inside_spec and path != Path(__file__).resolve():
            bad += [f"{rel} line {n}: names SPEC.md (the spec is docs/spec.md)"
                    for n, line in enumerate(text.splitlines(), start=1) if OLD_NAME.search(line)]
    assert not bad, "spec citations that do not resolve to docs/spec.md:\n" + "\n".join(bad)
    # The scan itself works: the repository cites the spec in dozens of places.
    assert total >= 30, f"only {total} citations found; is the scan broken?"


def test_scanner_catches_a_missing_section(sections):
    # Written with "@" for the section sign so that the repository scan skips these lines.
    text = ("# SPEC @3 rounds every product\n"
            "// see SPEC @2/@9 and SPEC @2.7\n"
            "x = 1  # @8 in a line that does not cite the spec\n").replace("@", "\u00a7")
    assert citations(text) == [(1, "3"), (2, "2"), (2, "9"), (2, "2.7")]
    assert unresolved(text, sections) == ["line 2: §9", "line 2: §2.7"]
    assert spec_sections("## 7. Extra\n### 7.1 More\n#### Untitled\n") == {"7", "7.1"}


def _table_rows(text: str) -> list[list[str]]:
    """Cells of each body row of the table under the heading TABLE_TITLE."""
    part = text.split(f"## {TABLE_TITLE}", 1)
    assert len(part) == 2, f"docs/spec.md has no '## {TABLE_TITLE}' section"
    rows = [line for line in part[1].splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the implementation table is empty"
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[2:]]


def _named(cell: str, base: str) -> list[tuple[Path, list[str]]]:
    """[(file, [function names])] of a cell written as "`a.py`: `f()`, `g()`; `b.h`: `h()`".
    A cell without a file names functions of `base`."""
    groups = []
    for chunk in cell.split(";"):
        ticks = re.findall(r"`([^`]+)`", chunk)
        if not ticks:
            continue
        files = [t for t in ticks if not t.endswith("()")]
        names = [t[:-2] for t in ticks if t.endswith("()")]
        target = base if not files else str(Path(base) / files[0])
        groups.append((ROOT / target, names))
    return groups


def test_implementation_table_names_exist():
    rows = _table_rows(SPEC.read_text(encoding="utf-8"))
    bases = ("tests/oracle.py", "csrc/common", "src/jax_moe_ar")
    missing, checked = [], 0
    for row in rows:
        assert len(row) == 4, f"row should have 4 cells: {row}"
        for cell, base in zip(row[1:], bases):
            for path, names in _named(cell, base):
                if not path.is_file():
                    missing.append(f"{path.relative_to(ROOT)} (row {row[0]!r})")
                    continue
                text = path.read_text(encoding="utf-8")
                for name in names:
                    checked += 1
                    if not re.search(rf"\b{re.escape(name)}\s*\(", text):
                        missing.append(f"{name}() in {path.relative_to(ROOT)} (row {row[0]!r})")
    assert not missing, "docs/spec.md's implementation table names what is not there:\n" + \
        "\n".join(missing)
    assert checked >= 30, f"only {checked} names checked; is the table parsed?"
