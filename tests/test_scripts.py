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
