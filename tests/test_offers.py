"""Commands that services answer: the hub forwards them to the service that offers them
(services/hub/offers.py), against a real hub and a real service process."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.control.client import CommandFailed
from services.control.protocol import ProtocolError
from services.hub.offers import OfferBook, check_offers
from tests.appliance import wait_for

HERE = Path(__file__).resolve().parent


@pytest.fixture
def offering(box):
    b = box()
    b.spawn("service", "hub")
    b.wait_ready()
    proc = subprocess.Popen([sys.executable, str(HERE / "offeringservice.py"), str(b.config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "probe.echo" in b.call("commands"), 10, "the probe's offers")
        yield b, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _error(b, cmd: str, args: dict | None = None) -> CommandFailed:
    with pytest.raises(CommandFailed) as info:
        b.call(cmd, args or {})
    return info.value


def test_a_service_answers_its_commands_through_the_hub(offering):
    b, proc = offering
    assert b.call("probe.echo", {"x": [1, 2]}) == {"echo": {"x": [1, 2]}, "pid": proc.pid}
    assert "answered by probe" in b.call("commands")["probe.echo"]
    err = _error(b, "probe.refuse", {"a": 1})
    assert (err.code, err.message) == ("bad_args", "cannot echo ['a']")
    err = _error(b, "probe.crash")
    assert err.code == "internal" and "ZeroDivisionError" in err.message
    assert b.call("probe.later", {"delay": 0.1}) == {"late": True}
    # the service keeps answering after a bug in one handler
    assert b.call("probe.echo", {})["pid"] == proc.pid


def test_a_service_checks_arguments_as_the_hub_does_before_its_handler_runs(offering):
    """One argument check (services/control/args.py) for the hub's commands and the services' own:
    the same refusal, word for word, and the handler never sees a call that does not fit."""
    b, proc = offering
    err = _error(b, "probe.echo", {"y": 1})
    assert (err.code, err.message) == ("bad_args", "unknown argument(s): y (allowed: x)")
    assert _error(b, "sessions", {"y": 1}).message == "unknown argument(s): y (allowed: room)"
    assert _error(b, "probe.later", {}).message == "missing argument 'delay'"
    assert _error(b, "probe.later", {"delay": "soon"}).message == "argument 'delay' has the wrong type (str)"
    assert _error(b, "probe.later", {"delay": True}).message == "argument 'delay' has the wrong type (bool)"
    assert _error(b, "snapshot", {"stream": 5}).message == "argument 'stream' has the wrong type (int)"
    assert b.call("probe.echo", {"x": "fine"})["pid"] == proc.pid


def test_a_silent_service_costs_the_client_a_timeout_not_the_hub(offering):
    b, _proc = offering
    t0 = time.monotonic()
    err = _error(b, "probe.later", {"delay": 0.9})   # past the offer's 0.6 s deadline
    took = time.monotonic() - t0
    assert err.code == "timeout" and "probe did not answer 'probe.later'" in err.message
    assert 0.5 < took < 0.95, took
    assert b.call("ping")["pong"]
    time.sleep(0.5)  # the late answer arrives and is refused by the hub; nothing breaks
    assert b.call("probe.echo", {"x": 1})["echo"] == {"x": 1}
    line = next(row for row in b.scrape().splitlines()
                if row.startswith("edgeroom_hub_forwarded_calls_total{") and 'command="probe.later"' in row
                and 'outcome="timeout"' in row)
    assert line.endswith(" 1.0"), line


def test_commands_of_a_stopped_or_absent_service_are_refused_by_name(offering):
    b, proc = offering
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    err = _error(b, "probe.echo")
    assert err.code == "unavailable" and "probe, which answers 'probe.echo', is stopped" in err.message
    err = _error(b, "record.start", {"target": "cam"})
    assert err.code == "unavailable" and "recorder service, which is not running" in err.message
    assert _error(b, "nosuch.thing").code == "unknown_command"


def test_offer_schema_and_reserved_names():
    book = OfferBook({"status"})
    with pytest.raises(ProtocolError, match="hub command"):
        book.update("probe", {"status": {"summary": "x"}}, None)
    for bad in ([], {"Bad Name": {}}, {"a.b": {"deadline": 0}}, {"a.b": {"summary": 3}}):
        with pytest.raises(ProtocolError):
            check_offers(bad)
    book.update("probe", {"probe.a": {}, "probe.b": {}}, None)
    book.update("probe", {"probe.a": {}}, None)          # a later heartbeat withdraws probe.b
    assert set(book.offers) == {"probe.a"}
    with pytest.raises(ProtocolError, match="answered already"):
        book.answer("s99", "probe")
