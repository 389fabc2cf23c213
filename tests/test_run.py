"""`edgeroom run` with real processes and signals: readiness, restarts, watchdog, clean stop,
hub restarts with services re-registering, reload, and the box's one scrape URL."""
from __future__ import annotations

import os
import signal
import time

import framebus
from tests.appliance import alive, metric_value, wait_for

CAPTURE = "capture@cam"
ALL = ("hub", CAPTURE, "supervisor")


def test_run_starts_the_box_and_sigterm_stops_everything(box, prefix):
    b = box()
    run = b.run()
    rows = b.wait_ready(*ALL)
    pids = [rows[s]["pid"] for s in ALL]
    assert rows["supervisor"]["pid"] == run.pid
    assert [s.stream for s in framebus.list_streams(prefix)] == ["cam"]
    assert (b.rundir / "control.sock").exists()

    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=10) == 0, b.log()[-3000:]
    assert time.monotonic() - t0 < 5
    assert not [pid for pid in pids if alive(pid)], "a service outlived edgeroom run"
    assert framebus.list_streams(prefix) == []
    assert not (b.rundir / "control.sock").exists()
    log = b.log()
    assert "capture@cam: stopped (status 0)" in log and "hub: stopped (status 0)" in log
    assert log.index("capture@cam: stopped") < log.index("hub: stopped"), "the hub must stop last"


def test_sigkilled_service_is_restarted_and_its_session_restarts(box):
    b = box()
    b.run()
    before = b.wait_ready(*ALL)[CAPTURE]
    with b.subscriber("hook.ON_VIDEO_SESSION_STARTED", "hook.ON_VIDEO_SESSION_ENDED") as sub:
        t0 = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_for(lambda: (r := b.services()[CAPTURE])["pid"] != before["pid"] and r["state"] == "ready" and r,
                         10, "capture restarted")
        took = time.monotonic() - t0
        ended, started = sub.recv(timeout=5), sub.recv(timeout=5)
    assert took < 5, f"restart took {took:.1f} s"
    assert after["restarts"] == 1
    assert ended.topic == "hook.ON_VIDEO_SESSION_ENDED" and ended.data["session"] == "cam"
    assert ended.data["reason"] in ("service restarted", "service stale")
    assert started.topic == "hook.ON_VIDEO_SESSION_STARTED" and started.data["room"] == "lobby"
    assert "capture@cam: exited (signal SIGKILL); restarting" in b.log()



def test_a_service_killed_every_5_s_restarts_after_restart_sec_each_time(box):
    """The supervisor's defaults for healthy_sec and the start limit (5 starts in 30 s): capture,
    ready within a second or two and killed every 5 s, five times (six starts in about 25 s),
    restarts after its restart_sec (0.2 s) every time and is never given up."""
    b = box()
    b.run()
    pid = b.wait_ready(*ALL)[CAPTURE]["pid"]
    back = []
    for _ in range(5):
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        row = wait_for(lambda old=pid: (r := b.services()[CAPTURE])["pid"] != old and r["state"] == "ready" and r, 5,
                       f"capture back before the next kill; log:\n{b.log()[-2000:]}")
        back.append(time.monotonic() - killed)
        pid = row["pid"]
        time.sleep(max(0.0, killed + 5.0 - time.monotonic()))
    log = b.log()
    assert log.count("capture@cam: exited (signal SIGKILL); restarting in 0.20 s\n") == 5, log[-3000:]
    assert "in a row" not in log and "start limit hit" not in log
    assert b.services()[CAPTURE]["restarts"] == 5 and b.services()[CAPTURE]["state"] == "ready"
    print(f"capture ready again after {', '.join(f'{t:.1f}' for t in back)} s")

def test_a_service_that_stops_pinging_is_killed_and_restarted(box):
    b = box()
    b.run()
    pid = b.wait_ready(*ALL)[CAPTURE]["pid"]
    os.kill(pid, signal.SIGSTOP)  # a hung main loop: no watchdog pings, no heartbeats, no SIGTERM handling
    after = wait_for(lambda: (r := b.services()[CAPTURE])["pid"] != pid and r["state"] == "ready" and r,
                     15, "capture restarted by the watchdog")
    assert after["restarts"] == 1
    assert not alive(pid)
    log = b.log()
    assert "capture@cam: no watchdog ping for" in log and "sending SIGABRT" in log
    kills = wait_for(lambda: metric_value(b.scrape(), "edgeroom_supervisor_watchdog_kills_total", unit=CAPTURE),
                     5, "watchdog kill metric")
    assert kills == 1


def test_hub_restart_loses_no_session(box):
    b = box()
    b.run()
    rows = b.wait_ready(*ALL)
    # the session with its video track (a track appears once the camera's first frame is out)
    sessions = wait_for(lambda: (got := b.call("sessions")) and got[0]["tracks"] and got, 5, "the camera's session")
    assert [s["session"] for s in sessions] == ["cam"]
    os.kill(rows["hub"]["pid"], signal.SIGKILL)
    b.client().close()
    after = b.wait_ready(*ALL)
    assert after["hub"]["pid"] != rows["hub"]["pid"]
    assert after[CAPTURE]["pid"] == rows[CAPTURE]["pid"], "capture must survive a hub restart"
    time.sleep(2.5)  # past session_grace: a session nobody confirmed would have ended by now
    again = b.call("sessions")
    assert again == sessions, "the session must be the same one (same start time), not ended and restarted"
    assert "remembered 1 session(s) from the previous hub" in b.log()
    assert metric_value(b.scrape(), "edgeroom_hub_sessions", service="hub") == 1


def test_scrape_url_carries_every_service(box, prefix):
    b = box()
    b.run()
    b.wait_ready(*ALL)
    def scrape_with_all():
        text = b.scrape()
        return text if f'service="{CAPTURE}"' in text and 'service="supervisor"' in text else None

    first = wait_for(scrape_with_all, 5, "every service on the scrape URL")
    for service in ALL:
        assert metric_value(first, "edgeroom_service_cpu_seconds_total", service=service) is not None, service
        assert metric_value(first, "edgeroom_service_up", service=service) == 1, service
    for line in first.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("edgeroom_"), line
    families = [line.split()[2] for line in first.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families)), "a family must appear once"
    helps = {line.split()[2] for line in first.splitlines() if line.startswith("# HELP")}
    assert set(families) <= helps
    assert metric_value(first, "edgeroom_bus_producer_alive", service="hub", stream="cam") == 1
    assert metric_value(first, "edgeroom_bus_slots", service="hub", stream="cam") == 8
    assert metric_value(first, "edgeroom_bus_items_total", service="hub", stream="cam") > 0
    frames = metric_value(first, "edgeroom_capture_frames_total", service=CAPTURE, stream="cam")
    later = wait_for(lambda: (v := metric_value(b.scrape(), "edgeroom_capture_frames_total", service=CAPTURE,
                                                stream="cam")) > frames and v, 5, "frames counter moving")
    assert later > frames
    with framebus.Consumer.attach("cam", prefix=prefix) as idle:  # attached, never reading: it falls behind
        def lagging():
            text = b.scrape()
            lag = metric_value(text, "edgeroom_bus_consumer_lag_items", service="hub", stream="cam")
            return text if lag and lag > 8 else None
        text = wait_for(lagging, 5, "the idle consumer's lag on the scrape URL")
        assert metric_value(text, "edgeroom_bus_consumers", service="hub", stream="cam") == 1
        assert metric_value(text, "edgeroom_bus_occupied_slots", service="hub", stream="cam") == 8
        assert idle.lag > 8


def test_sighup_reloads_and_names_what_needs_a_restart(box):
    b = box()
    run = b.run()
    b.wait_ready(*ALL)
    b.config.write_text(b.config.read_text().replace('level = "debug"', 'level = "info"')
                        .replace('prefix = "', 'prefix = "x'))
    run.send_signal(signal.SIGHUP)
    wait_for(lambda: "needs a restart of capture@cam: bus.prefix" in b.log(), 5, "reload report")
    assert "config reloaded; SIGHUP sent to every running service" in b.log()
    b.config.write_text("[hub]\nstale_after = 0.01\n")
    run.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected, keeping the running config" in b.log(), 5, "bad reload rejected")
    assert b.wait_ready(*ALL)


def test_a_second_box_on_the_same_runtime_dir_is_refused(box):
    b = box()
    b.run()
    b.wait_ready(*ALL)
    second = b.spawn("run")
    assert second.wait(timeout=20) == 1
    assert "another run (pid" in b.log()
    hub = b.spawn("service", "hub")
    assert hub.wait(timeout=20) == 1
    assert "another hub (pid" in b.log()
    assert b.wait_ready(*ALL), "the first box must be unharmed"
