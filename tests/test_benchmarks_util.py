"""medsec.utils.benchmarks: the shared BENCHMARKS.md sections and the machine summary."""
from __future__ import annotations

from pathlib import Path

import pytest

from medsec.utils.benchmarks import TITLE, machine_summary, update_section


def test_update_section_creates_file_with_title(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    update_section(path, "classification", "## Classification\n| a | b |")
    text = path.read_text()
    assert text.startswith(TITLE + "\n")
    assert "<!-- classification:start -->\n## Classification\n| a | b |\n<!-- classification:end -->" in text


def test_update_section_replaces_in_place_and_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    update_section(path, "first", "old first")
    update_section(path, "second", "second body")
    path.write_text(path.read_text() + "\nhand-written note\n")
    update_section(path, "first", "new first")
    text = path.read_text()
    assert "old first" not in text and "new first" in text
    assert "second body" in text and "hand-written note" in text
    assert text.count("<!-- first:start -->") == 1 and text.count("<!-- first:end -->") == 1
    assert text.index("new first") < text.index("second body")  # replaced where it was, not appended


def test_update_section_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# my title\n\nintro\n")
    update_section(path, "x", "body with $1 and \\1 kept literally")
    text = path.read_text()
    assert text.startswith("# my title\n\nintro\n")
    assert "body with $1 and \\1 kept literally" in text


def test_update_section_rejects_odd_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        update_section(tmp_path / "B.md", "bad name -->", "x")


def test_machine_summary_names_cpu_and_torch() -> None:
    summary = machine_summary()
    assert "cores" in summary and "torch" in summary
