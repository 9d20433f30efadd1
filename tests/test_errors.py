"""User errors are found behind MONAI's and the DataLoader's wrappers."""
from __future__ import annotations

import logging

import pytest

from medsec.errors import DataError, user_error_message, user_errors_exit


def test_message_found_through_exception_chain() -> None:
    try:
        try:
            raise DataError("cannot read image file /x/1.png")
        except DataError as inner:
            raise RuntimeError("applying transform <LoadImageNamed>") from inner
    except RuntimeError as outer:
        assert user_error_message(outer) == "cannot read image file /x/1.png"


def test_message_found_in_worker_traceback_text() -> None:
    remote = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File ...\nmedsec.errors.DataError: cannot read image file /x/2.png: OSError\n")
    assert user_error_message(remote) == "cannot read image file /x/2.png: OSError"
    assert user_error_message(ValueError("unrelated")) is None


def test_wrapper_exits_2_for_user_errors_and_keeps_bugs(caplog: pytest.LogCaptureFixture) -> None:
    @user_errors_exit
    def bad_input() -> None:
        raise DataError("CSV /d/labels.csv lacks column 'label'")

    @user_errors_exit
    def bug() -> None:
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        bad_input()
    assert stop.value.code == 2
    assert "error: CSV /d/labels.csv lacks column 'label'" in caplog.text
    with pytest.raises(KeyError):
        bug()
