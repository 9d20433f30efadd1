"""The scripts in scripts/ import from the installed package alone (no sys.path edits) and answer
--help with their options; running them is the benchmarks' job, not the tests'."""
from __future__ import annotations

import runpy

import pytest

from medsec.utils.config import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "scripts").glob("*.py"))


def test_every_script_is_listed() -> None:
    assert len(SCRIPTS) == 15


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_imports_and_answers_help(script, capsys: pytest.CaptureFixture[str]) -> None:
    source = script.read_text()
    assert "sys.path" not in source and "from tests" not in source
    namespace = runpy.run_path(str(script), run_name="medsec_script_check")  # not __main__: nothing runs
    with pytest.raises(SystemExit) as exit_:
        namespace["main"](["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--output OUTPUT" in out and f"'{namespace['SECTION']}' section" in out


@pytest.mark.slow
def test_adversarial_dense_smoke(tmp_path) -> None:
    """``benchmark_adversarial.py --dense --quick`` trains both dense models on synthetic data, attacks
    each at every epsilon through the real verb and writes its own section."""
    script = REPO_ROOT / "scripts" / "benchmark_adversarial.py"
    namespace = runpy.run_path(str(script), run_name="medsec_script_check")
    output = tmp_path / "B.md"
    argv = ["--dense", "--quick", "--output", str(output), "--work", str(tmp_path / "work")]
    assert namespace["main"](argv) == 0
    text = output.read_text()
    assert "<!-- adversarial_dense:start -->" in text and "<!-- adversarial:start -->" not in text
    rows = [line for line in text.splitlines() if line.startswith(("| nih |", "| hippocampus |"))]
    assert len(rows) == 8 and all(" | 4 | " in row for row in rows)  # 2 models x 4 epsilons, 4 images each


def test_classification_seed_summary() -> None:
    """``benchmark_classification.py --seeds``: one row with the mean ± sd of the seeds' runs, each seed
    listed with its CPU minutes, and the goal judged on the mean."""
    namespace = runpy.run_path(str(REPO_ROOT / "scripts" / "benchmark_classification.py"),
                               run_name="medsec_script_check")
    recipe = "medsec train experiment=breastmnist_resnet18"
    runs = [{"key": "breastmnist", "seed": seed, "command": f"{recipe} seed={seed}", "test_auroc": auroc,
             "test_acc": 0.85, "val_auroc_best": 0.9, "epochs": 60, "wall_s": 300.0, "cpu_s": 480.0,
             "train_images_per_s": 50.0, "per_class": {}}
            for seed, auroc in ((42, 0.90), (43, 0.92), (44, 0.91))]
    row = namespace["summarise"](runs)
    assert row["test_auroc"] == pytest.approx(0.91) and row["test_auroc_sd"] == pytest.approx(0.01)
    assert row["command"] == f"{recipe} seed=<s>" and row["seeds"] == runs
    text = "\n".join(namespace["_seed_lines"](row))
    assert text.count("| 8.0 |") == 4  # three seeds and their mean, 480 CPU seconds each
    assert "| mean ± sd | 0.910 ± 0.010 |" in text and "0.910, met" in text
    assert namespace["summarise"](runs[:1]) is runs[0]


@pytest.mark.slow
@pytest.mark.realdata
def test_detection_smoke(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmark_detection.py --quick``: every synthetic variant (plain, perceptual with and without
    block scrambling, AES), both attacks and the hippocampus run reach the section; the AES row equals
    the plain one."""
    from tests.data.fakes import shared_data

    monkeypatch.setenv("MEDSEC_DATA_DIR", str(shared_data("msd_hippocampus").parent))
    namespace = runpy.run_path(str(REPO_ROOT / "scripts" / "benchmark_detection.py"), run_name="medsec_script_check")
    output = tmp_path / "B.md"
    assert namespace["main"](["--quick", "--threads", "1", "--output", str(output), "--out-dir", str(tmp_path / "runs")]) == 0
    lines = output.read_text().splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:6] for line in lines
            if line.startswith(("| plain |", "| protect=")) and line.count(" | ") == 6}
    assert set(rows) == {"plain", "protect=[perceptual] (block 8)", "protect=[perceptual] (block 8, positions kept)",
                         namespace["AES_ROW"]}
    assert rows[namespace["AES_ROW"]] == rows["plain"]
    assert sum(line.startswith(("| pgd |", "| fgsm |")) for line in lines) == 6
    assert any(line.startswith("| **mean (mAP@0.5)** |") for line in lines)


@pytest.mark.slow
@pytest.mark.realdata
def test_compression_smoke(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmark_compression.py --quick``: two tiny learned codecs and JPEG 2000, each through the
    secure packet, against the standard codecs; the sealed JPEG 2000 curve beats JPEG (BD-rate < 0)."""
    from tests.data.fakes import shared_data

    monkeypatch.setenv("MEDSEC_DATA_DIR", str(shared_data("nih_cxr14_sample").parent))
    namespace = runpy.run_path(str(REPO_ROOT / "scripts" / "benchmark_compression.py"), run_name="medsec_script_check")
    output = tmp_path / "B.md"
    assert namespace["main"](["--quick", "--output", str(output)]) == 0
    text = output.read_text()
    assert (tmp_path / "benchmarks" / "secure_compression_rd.png").stat().st_size > 10_000
    sealed = next(line for line in text.splitlines() if line.startswith(f"| {namespace['SEALED_J2K']} | JPEG |"))
    assert float(sealed.split(" | ")[2].removesuffix(" %")) < 0
    assert "the secure channel with JPEG 2000 inside" in text and "met (-" in text
