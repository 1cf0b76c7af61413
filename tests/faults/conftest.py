"""The fault suite: one isolated stack (its own Kafka, PostgreSQL and S3) with one isolated set
of loopstream's services on it, started once per session and shared by the fault tests in turn.

Nothing here touches the shared stack or its services: each test stops or kills parts of its own
copy, and the `services` fixture brings back whatever a test left dead before the next one.
Figures of each test (time, calls, retried errors, ledger) are printed at the end of the run and
written to `<data dir>/fault-figures.json` for docs/faults.md.

Each test has a timeout of 480 s: the first one's includes starting the stack and the services
(about 2.5 min on a busy 2-core machine; every worker imports torch).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings, get_settings
from tests.faults.loop import Calls
from tests.isolated import IsolatedServices, IsolatedStack, isolated_services, isolated_stack

FIGURES: list[dict[str, Any]] = []
_LAST_CALL_OUTCOME: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults" in str(item.path):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def fault_root() -> Iterator[Path]:
    """The isolated stack's data and the services' logs. Kept after a failed run (the path is
    printed) for the post-mortem; removed after a green one."""
    root = Path(tempfile.mkdtemp(prefix="loopstream-faults-"))
    failed_before = _failures()
    yield root
    if _failures() == failed_before:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nfault suite data and logs kept in {root}")


def _failures() -> int:
    return int(getattr(_SESSION, "testsfailed", 0)) if _SESSION is not None else 0


_SESSION: pytest.Session | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _SESSION
    _SESSION = session


@pytest.fixture(scope="session")
def fault_stack(fault_root: Path) -> Iterator[IsolatedStack]:
    with isolated_stack(get_settings(), fault_root / "stack") as stack:
        yield stack


@pytest.fixture(scope="session")
def fault_services(fault_stack: IsolatedStack, fault_root: Path) -> Iterator[IsolatedServices]:
    with isolated_services(fault_stack.settings, fault_root / "services") as services:
        yield services


@pytest.fixture
def services(
    fault_stack: IsolatedStack, fault_services: IsolatedServices
) -> Iterator[IsolatedServices]:
    """The isolated services, every server and process up before the test; their log tails are
    printed when the test fails."""
    for name in ("kafka", "postgres", "s3"):
        fault_stack.start(name)
    if _LAST_CALL_OUTCOME.get("outcome") not in (None, "passed"):
        # A test that failed (or xfailed on a known bug) may leave a process alive but stuck:
        # the next one starts from fresh processes, so one bug fails one test.
        fault_services.down()
    fault_services.up()
    yield fault_services


@pytest.fixture
def settings(fault_services: IsolatedServices) -> Settings:
    return fault_services.settings


@pytest.fixture
def calls(services: IsolatedServices) -> Iterator[Calls]:
    calls = Calls(services.base_url, services.api_key)
    yield calls
    calls.close()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with what it measured; timed and collected for the summary."""
    entry: dict[str, Any] = {"test": request.node.name}
    started = time.monotonic()
    yield entry
    entry["seconds"] = round(time.monotonic() - started, 1)
    FIGURES.append(entry)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        _LAST_CALL_OUTCOME["outcome"] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    services = item.funcargs.get("services") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and isinstance(services, IsolatedServices):
        report.sections.append(("isolated services' logs", services.log_tails(25)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault figures")
    for entry in FIGURES:
        terminalreporter.write_line(json.dumps(entry, default=str))
    out = get_settings().data_dir / "fault-figures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=2, default=str))
