"""The pytest side of the ``gpu-tests`` stage (``pytest -p trifuse.bench.device.plugin``): each test
under an alarm of ``TRIFUSE_TEST_TIMEOUT`` seconds, and each outcome a row of the stage, appended to
``TRIFUSE_DEVICE_ROWS`` as soon as it is known."""

from __future__ import annotations

import json
import os
import signal

def _alarm(signum, frame):
    raise TimeoutError(f"test exceeded its {os.environ.get('TRIFUSE_TEST_TIMEOUT')} s alarm "
                       "(scripts/device-check.sh per-test timeout)")


try:
    import pytest as _pytest
except ImportError:  # the device check itself does not need pytest
    _pytest = None

if _pytest is not None:
    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        seconds = int(os.environ.get("TRIFUSE_TEST_TIMEOUT", "0"))
        if seconds > 0:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(seconds)
        try:
            yield
        finally:
            if seconds > 0:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)


def pytest_runtest_logreport(report):
    rows_file = os.environ.get("TRIFUSE_DEVICE_ROWS")
    if not rows_file or not os.environ.get("TRIFUSE_TEST_TIMEOUT"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        row = {"stage": os.environ.get("TRIFUSE_DEVICE_STAGE"), "test": report.nodeid, "when": report.when,
               "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.outcome == "failed":
            text = str(report.longrepr) if report.longrepr else ""
            row["message"] = (text.strip().splitlines() or [""])[-1][:300]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            row["message"] = str(report.longrepr[2])[:200]
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
