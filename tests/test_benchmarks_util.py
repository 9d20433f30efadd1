"""medsec.utils.benchmarks: the shared BENCHMARKS.md sections, the machine summary, the scripts'
options, cells and timed training runs."""
from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

from medsec.utils.benchmarks import (
    BENCHMARKS_MD,
    TITLE,
    benchmark_parser,
    command,
    data_config,
    fmt,
    machine_summary,
    mark,
    produced_by,
    publish,
    timed_train,
    update_section,
)
from tests.conftest import TINY


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


def test_table_cells_and_verdicts() -> None:
    assert fmt(None) == "-" and fmt(0.12345) == "0.123" and fmt(2.0, 1) == "2.0"
    assert mark(True) == "met" and mark(False) == "**MISSED**"
    line = command("train", ["experiment=x", "data.source.root=/a b"])
    assert line == "medsec train experiment=x 'data.source.root=/a b'"


def test_produced_by_quotes_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["scripts/b.py", "--set", "a=b c"])
    started = dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.timezone.utc)
    expected = "Produced by `python scripts/b.py --set 'a=b c'` on 2025-01-02 03:04 UTC"
    assert produced_by("b.py", started) == expected
    monkeypatch.setattr(sys, "argv", ["scripts/b.py"])
    assert produced_by("b.py", started) == "Produced by `python scripts/b.py` on 2025-01-02 03:04 UTC"


def test_benchmark_parser_and_publish(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = benchmark_parser("doc", "sec", quick="smoke").parse_args([])
    assert args.output == BENCHMARKS_MD and args.output.name == "BENCHMARKS.md" and args.quick is False
    args = benchmark_parser("doc", "sec").parse_args(["--output", str(tmp_path / "B.md")])
    assert not hasattr(args, "quick")
    publish(args.output, "sec", "| a |")
    assert "<!-- sec:start -->\n| a |\n<!-- sec:end -->" in (tmp_path / "B.md").read_text()
    assert capsys.readouterr().out == "| a |\n"


def test_data_config_is_the_recipes_resolved_data() -> None:
    data = data_config(["experiment=denoising_synthetic"])
    assert data["source"]["num_samples"] == [256, 32, 32] and data["batch_size"] == 16
    assert "${" not in repr(data)  # resolved


@pytest.mark.parametrize("callbacks", ["default", "none"])
def test_timed_train_records_every_epoch(tmp_path: Path, callbacks: str) -> None:
    tiny = [o for o in TINY if not o.startswith("callbacks.")]  # the `none` group has none to switch off
    metrics, epochs, wall = timed_train([*tiny, "trainer.max_epochs=2", "data.source.num_samples=[64,32,32]",
                                         f"callbacks={callbacks}", "test=false"], tmp_path)
    assert len(epochs) == 2 and all(e["images"] == 64 and e["seconds"] > 0 for e in epochs)
    assert 0 < sum(e["seconds"] for e in epochs) < wall
    assert 0 <= metrics["val/acc"] <= 1
