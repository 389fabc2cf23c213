"""The configuration loader: defaults -> TOML file -> EDGEROOM_ environment -> one validation."""
from __future__ import annotations

import json
import pickle
import re
import tomllib
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from services.capture.sources import config_classes
from services.capture.sources.synthetic import SyntheticConfig as SourceConfig
from services.runtime.config import (
    Change,
    Config,
    ConfigError,
    HookConfig,
    HubConfig,
    ServiceConfig,
    defaults,
    diff,
    load,
    loads,
    parse_bytes,
    parse_host_port,
)
from services.runtime.schema import SCHEMA, Section, Table, Variants

SAMPLE = Path(__file__).resolve().parent.parent / "config" / "edgeroom.toml"
defaults()  # every part declared (the services' spec modules found)
SECTIONS = {name: p.cls for name, p in SCHEMA.parts.items() if isinstance(p, Section)}  # new ones included
TABLES = {name: p.entry for name, p in SCHEMA.parts.items() if isinstance(p, Table)}
SERVICE_NAMES = tuple(SCHEMA.services)
SYNC_HOOKS = tuple(SCHEMA.sync_hooks)


def error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, env={} if env is None else env)
    return info.value


def env_error(env: dict[str, str], text: str = "") -> ConfigError:
    return error(text, env)


# --- defaults and the sample file -------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    cfg = defaults()
    assert cfg == Config()
    assert cfg.hub == HubConfig(heartbeat_interval=1.0, stale_after=5.0, session_grace=10.0,
                                metrics_listen="127.0.0.1:9750")
    assert cfg.hooks == {"BEFORE_BRIDGE_VIDEO": HookConfig(0.5, "allow"), "ON_VISION_RESULT": HookConfig(2.0, "allow")}
    assert list(cfg.services) == ["hub", "capture", "rtp", "sip", "webrtc", "decode", "vision", "avatar", "encode",
                                  "recorder", "bridge", "mcp"]
    assert all(s == ServiceConfig() for s in cfg.services.values())
    assert cfg.sources == {"synthetic": SourceConfig(width=1280, height=720, fps=30.0)}
    assert load(env={}) == cfg


def test_sample_loads_equal_to_defaults():
    assert load(SAMPLE, env={}) == defaults()
    assert load(str(SAMPLE), env={}) == defaults()


def _entry_class(table: str, body: dict):
    top, _, entry = table.partition(".")
    if not entry:
        return SECTIONS[top]
    cls = TABLES[top]
    return cls.pick(body.get("kind", cls.default)) if isinstance(cls, Variants) else cls


def _documented(lines: list[str]):
    """(table, key, comment, line number) of every key in `lines`, with the # comment block above it."""
    table = None
    for number, line in enumerate(lines, 1):
        if m := re.match(r"^\[([^\]]+)\]\s*$", line):
            table = m[1]
            continue
        if not (m := re.match(r"^([a-z_][a-z0-9_]*)\s*=", line)):
            continue
        block = []
        for above in reversed(lines[: number - 1]):
            if not above.startswith("#"):
                break
            block.insert(0, above)
        yield table, m[1], " ".join(block), number


def _examples(text: str, table: str = "sources") -> list[str]:
    """The commented example tables of the sample (`# [sources.door]` up to a blank line), uncommented."""
    out, current = [], None
    for line in text.splitlines():
        if re.match(rf"^# \[{table}\.[a-z0-9_-]+\]$", line):
            current = []
            out.append(current)
        if current is not None and line.startswith("# "):
            current.append(line[2:])
        elif current is not None:
            current = None
    return ["\n".join(block) for block in out]


def _check_documented(text: str, where: str) -> set[tuple[str, str]]:
    lines, seen = text.splitlines(), set()
    bodies = {}
    doc = tomllib.loads(text)
    for top, value in doc.items():
        for entry, body in (value.items() if top in TABLES else [("", value)]):
            bodies[f"{top}.{entry}" if entry else top] = body
    for table, key, comment, number in _documented(lines):
        assert comment, f"{where} line {number}: {table}.{key} has no comment above it"
        meta = {f.name: f.metadata for f in fields(_entry_class(table, bodies[table]))}[key]
        live = meta["reload"] == "live"
        assert ("Applies on reload" in comment) == live, f"{where} line {number}: {table}.{key}: {comment}"
        assert ("Needs a restart" in comment) != live, f"{where} line {number}: {table}.{key}: {comment}"
        seen.add((table, key))
    return seen


def test_sample_documents_every_key_and_its_reload_mode():
    text = SAMPLE.read_text()
    seen = _check_documented(text, "sample")
    expected = {(name, f.name) for name, cls in SECTIONS.items() for f in fields(cls)}
    expected |= {(f"hooks.{hook}", f.name) for hook in SYNC_HOOKS for f in fields(HookConfig)}
    expected |= {("services.hub", f.name) for f in fields(ServiceConfig)}
    expected |= {("sources.synthetic", f.name) for f in fields(SourceConfig)}
    assert seen == expected


def test_every_source_kind_has_a_documented_example_in_the_sample_that_loads():
    """A kind registered without its keys in the sample fails here: each kind other than the default
    has a commented example table with every key of its own (the keys all kinds share are documented
    in [sources.synthetic]), and the example, uncommented, is a valid config."""
    common = {f.name for f in fields(SourceConfig)}
    by_kind = {}
    for example in _examples(SAMPLE.read_text()):
        seen = _check_documented(example, "sample example")
        cfg = loads(example, env={})
        (name, source), = cfg.sources.items()
        by_kind[source.kind] = {key for _, key in seen}
    for kind, cls in config_classes().items():
        if kind == "synthetic":
            continue
        assert kind in by_kind, f"source kind {kind!r} has no example table in config/edgeroom.toml"
        own = {f.name for f in fields(cls)} - common
        assert own <= by_kind[kind], f"the {kind} example lacks {sorted(own - by_kind[kind])}"


def test_the_encoder_example_in_the_sample_documents_every_key_and_loads():
    """No encoder runs by default, so its keys are documented in a commented example table: every key of
    [encoders.NAME] with its comment and reload mode, and the example, uncommented, is a valid config."""
    examples = _examples(SAMPLE.read_text(), "encoders")
    assert len(examples) == 1, examples
    seen = {key for _, key in _check_documented(examples[0], "sample example")}
    cfg = loads(examples[0], env={})
    (name, encoder), = cfg.encoders.items()
    assert seen == {f.name for f in fields(TABLES["encoders"])}
    assert encoder.input == "synthetic-raw" and encoder.codec == "h264"


def test_every_table_the_default_box_has_no_entry_of_has_a_documented_example_that_loads():
    """[rtp.NAME] (calls): the default box runs none, so the sample documents every key in a commented
    example table, and the example, uncommented, is a valid config with one entry."""
    for table in ("rtp", "encoders"):
        cls = TABLES[table]
        examples = _examples(SAMPLE.read_text(), table)
        assert len(examples) == 1, f"config/edgeroom.toml has {len(examples)} example [{table}.NAME] tables"
        seen = _check_documented(examples[0], "sample example")
        assert {key for _, key in seen} == {f.name for f in fields(cls)}
        cfg = loads(examples[0], env={})
        assert len(getattr(cfg, table)) == 1


def test_sample_mentions_env_overrides_and_config_check():
    head = SAMPLE.read_text().split("[box]")[0]
    assert "edgeroom config check" in head
    assert "EDGEROOM_HUB__HEARTBEAT_INTERVAL" in head
    assert "REPLACES" in SAMPLE.read_text()


def test_every_field_has_help_and_reload_mode():
    for cls in SCHEMA.classes():
        for f in fields(cls):
            assert f.metadata["help"], f"{cls.__name__}.{f.name}"
            assert f.metadata["reload"] in ("live", "restart"), f"{cls.__name__}.{f.name}"


def test_to_dict_is_plain_json():
    data = defaults().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["services"]["capture"]["restart"] == "on-failure"
    assert data["hooks"]["ON_VISION_RESULT"] == {"deadline": 2.0, "on_timeout": "allow"}


# --- unknown keys and names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "known"),
    [
        ("colour = 1", "colour", "box, log, bus, control, hub, hooks, services, sources"),
        ("[hub]\nheartbeat = 1.0", "hub.heartbeat",
         "heartbeat_interval, stale_after, session_grace, metrics_listen"),
        ("[services.capture]\nwatchdog = 3", "services.capture.watchdog", "enabled, restart, restart_sec"),
        ("[services.camera]", "services.camera",
         "hub, capture, rtp, sip, webrtc, decode, vision, avatar, encode, recorder, bridge, mcp"),
        ("[hooks.before_bridge_video]", "hooks.before_bridge_video", "BEFORE_BRIDGE_VIDEO, ON_VISION_RESULT"),
        ("[hooks.ON_AUDIO]\ndeadline = 1", "hooks.ON_AUDIO", "BEFORE_BRIDGE_VIDEO, ON_VISION_RESULT"),
        ("[sources.cam1]\nformat = 'rgb'", "sources.cam1.format",
         "kind, room, reconnect_min, reconnect_max, decode, pixel_format, hw_decode, decode_threads, "
         "history_seconds, width, height"),
        ("[sources.cam1]\nkind = 'url'\nurl = 'rtsp://x/1'\nwidth = 640", "sources.cam1.width",
         "kind, room, reconnect_min, reconnect_max, decode, pixel_format, hw_decode, decode_threads, "
         "history_seconds, url, transport"),
    ],
)
def test_unknown_keys_are_rejected_with_the_known_ones(text, key, known):
    e = error(text)
    assert e.key == key
    assert e.source == "<string>"
    assert str(e).startswith(f"<string>: {key}: unknown key") and f"(known: {known}" in str(e)


def test_unknown_top_level_key_message_is_exact():
    assert str(error("colour = 1")) == (
        "<string>: colour: unknown key (known: box, log, bus, control, hub, hooks, services, sources, rtp, sip, "
        "webrtc, vision, pipelines, avatar, avatars, encoders, recorder, bridge, mcp)")


def test_every_service_name_is_accepted_with_field_defaults():
    text = "".join(f"[services.{name}]\n" for name in SERVICE_NAMES)
    cfg = loads(text, env={})
    assert list(cfg.services) == list(SERVICE_NAMES)
    assert all(s == ServiceConfig() for s in cfg.services.values())


def test_bad_source_name():
    e = error("[sources.Cam1]")
    assert str(e) == "<string>: sources.Cam1: a name here must match ^[a-z0-9][a-z0-9_-]{0,31}$"


def test_a_value_where_a_table_belongs():
    assert str(error("hub = 3")) == "<string>: hub: expected a table, got 3"
    assert str(error("[services]\ncapture = true")) == "<string>: services.capture: expected a table, got true"


# --- types, bounds, choices, cross-key rules -------------------------------------------------------


def test_a_bool_is_not_an_int_and_an_int_is_not_a_bool():
    assert str(error("[services.hub]\nnice = true")) == "<string>: services.hub.nice: expected an integer, got true"
    assert str(error("[services.hub]\nenabled = 1")) == "<string>: services.hub.enabled: expected true or false, got 1"
    assert error("[hub]\nheartbeat_interval = false").reason == "expected a number, got false"


def test_strict_types_strings_and_floats():
    assert error("[hub]\nheartbeat_interval = 'abc'").reason == "expected a number, got 'abc'"
    assert error("[sources.a]\nwidth = 1280.0").reason == "expected an integer, got 1280.0"
    assert error("[bus]\nprefix = 5").reason == "expected a string, got 5"
    assert error("[hub]\nstale_after = nan").reason == "expected a finite number, got nan"


def test_an_int_is_accepted_where_a_float_is_expected():
    cfg = loads("[hub]\nheartbeat_interval = 2\nstale_after = 7", env={})
    assert cfg.hub.heartbeat_interval == 2.0 and type(cfg.hub.heartbeat_interval) is float
    assert type(cfg.hub.stale_after) is float


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[control]\nrequest_timeout = 0.01", "control.request_timeout", "must be >= 0.1, got 0.01"),
        ("[control]\nrequest_timeout = 61", "control.request_timeout", "must be <= 60, got 61.0"),
        ("[hub]\nheartbeat_interval = 0.01", "hub.heartbeat_interval", "must be >= 0.05, got 0.01"),
        ("[control]\nmax_message_bytes = 1023", "control.max_message_bytes", "must be >= 1024, got 1023"),
        ("[services.hub]\nnice = 20", "services.hub.nice", "must be <= 19, got 20"),
        ("[services.hub]\nstart_limit_burst = 0", "services.hub.start_limit_burst", "must be >= 1, got 0"),
        ("[sources.a]\nwidth = 1281", "sources.a.width", "must be even, got 1281"),
        ("[sources.a]\nheight = 8", "sources.a.height", "must be >= 16, got 8"),
        ("[hooks.BEFORE_BRIDGE_VIDEO]\ndeadline = 31", "hooks.BEFORE_BRIDGE_VIDEO.deadline", "must be <= 30, got 31.0"),
        ("[services.capture]\nwatchdog_sec = 0.1", "services.capture.watchdog_sec",
         "must be >= 0.2, got 0.1; 0 turns it off"),
        ("[bus]\nprefix = 'a.b'", "bus.prefix", "must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$, got 'a.b'"),
        ("[box]\nname = ''", "box.name", "must match ^[A-Za-z0-9_.-]{1,63}$, got ''"),
    ],
)
def test_bounds(text, key, reason):
    e = error(text)
    assert (e.key, e.reason) == (key, reason)
    assert str(e) == f"<string>: {key}: {reason}"


def test_bounds_are_inclusive_and_watchdog_zero_is_off():
    cfg = loads("[control]\nrequest_timeout = 60\n[services.capture]\nwatchdog_sec = 0\n"
                "[sources.a]\nwidth = 7680\nheight = 16\nfps = 0.1", env={})
    assert cfg.control.request_timeout == 60.0
    assert cfg.services["capture"].watchdog_sec == 0.0
    assert cfg.sources["a"] == SourceConfig(width=7680, height=16, fps=0.1)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[hooks.ON_VISION_RESULT]\non_timeout = 'maybe'", "hooks.ON_VISION_RESULT.on_timeout",
         "must be one of allow, block; got 'maybe'"),
        ("[log]\nlevel = 'INFO'", "log.level", "must be one of debug, info, warning, error; got 'INFO'"),
        ("[services.hub]\nrestart = 'sometimes'", "services.hub.restart",
         "must be one of no, on-failure, always; got 'sometimes'"),
        ("[sources.a]\nkind = 'camera'", "sources.a.kind",
         "must be one of synthetic, file, screen, url, webcam; got 'camera'"),
    ],
)
def test_choices(text, key, reason):
    e = error(text)
    assert (e.key, e.reason) == (key, reason)


def test_stale_after_must_exceed_heartbeat_interval():
    e = error("[hub]\nheartbeat_interval = 1.0\nstale_after = 1.0")
    assert str(e) == "<string>: hub.stale_after: must be greater than hub.heartbeat_interval (1.0)"
    # the default stale_after (5.0) against a file's heartbeat: still reported, with the file as source
    e = error("[hub]\nheartbeat_interval = 6")
    assert (e.key, e.source) == ("hub.stale_after", "<string>")
    assert loads("[hub]\nheartbeat_interval = 1.0\nstale_after = 1.01", env={}).hub.stale_after == 1.01


def test_restart_max_sec_at_least_restart_sec():
    e = error("[services.capture]\nrestart_sec = 20")
    assert str(e) == ("<string>: services.capture.restart_max_sec: "
                      "must be >= services.capture.restart_sec (20.0)")


def test_curve_dir_is_required_with_a_tcp_endpoint():
    e = error("[control]\ntcp_events = '0.0.0.0:9752'")
    assert str(e) == ("<string>: control.curve_dir: "
                      "required when control.tcp_control or control.tcp_events is set")
    cfg = loads("[control]\ntcp_control = '[::]:9751'\ncurve_dir = '/etc/edgeroom/curve'", env={})
    assert cfg.control.tcp_control == "[::]:9751"


@pytest.mark.parametrize("bad", ["9751", ":9751", "host:", "host:65536", "host:port", "::1:9751", "[::1]9751",
                                 "a b:1", "host:-1"])
def test_bad_host_port(bad):
    e = error(f"[control]\ntcp_control = '{bad}'\ncurve_dir = '/k'")
    assert e.key == "control.tcp_control"
    assert repr(bad) in e.reason or "65536" in e.reason


def test_metrics_listen_port_zero_and_off():
    assert loads("[hub]\nmetrics_listen = 'localhost:0'", env={}).hub.metrics_listen == "localhost:0"
    assert loads("[hub]\nmetrics_listen = ''", env={}).hub.metrics_listen == ""


def test_cpu_quota_and_memory_max():
    cfg = loads("[services.capture]\ncpu_quota = '150%'\nmemory_max = '512M'", env={})
    assert (cfg.services["capture"].cpu_quota, cfg.services["capture"].memory_max) == ("150%", "512M")
    assert error("[services.hub]\ncpu_quota = '150'").reason == (
        "expected a percentage 1%..10000% like '150%', got '150'; '' turns it off")
    assert error("[services.hub]\ncpu_quota = '10001%'").key == "services.hub.cpu_quota"
    assert error("[services.hub]\nmemory_max = '512MB'").key == "services.hub.memory_max"
    assert error("[services.hub]\nmemory_max = '0'").reason == "must be more than 0 bytes, got '0'; '' turns it off"


def test_the_first_error_in_file_order_is_reported():
    assert error("[hub]\nstale_after = 'x'\nheartbeat_interval = 'y'").key == "hub.stale_after"
    assert error("[log]\nformat = 'xml'\n[box]\nname = '!'").key == "log.format"
    assert error("[services.vision]\nnice = 99\n[services.hub]\nnice = 99").key == "services.vision.nice"


# --- merging -----------------------------------------------------------------------------------------


def test_services_and_hooks_merge_while_sources_replace():
    cfg = loads("[services.capture]\nwatchdog_sec = 3\n[hooks.ON_VISION_RESULT]\non_timeout = 'block'\n"
                "[sources.cam1]\nfps = 25", env={})
    assert cfg.services == {"hub": ServiceConfig(), "capture": replace(ServiceConfig(), watchdog_sec=3.0),
                            "rtp": ServiceConfig(), "sip": ServiceConfig(), "webrtc": ServiceConfig(),
                            "decode": ServiceConfig(), "vision": ServiceConfig(), "encode": ServiceConfig(),
                            "recorder": ServiceConfig(), "bridge": ServiceConfig(), "mcp": ServiceConfig(),
                            "avatar": ServiceConfig()}
    assert cfg.hooks["ON_VISION_RESULT"] == HookConfig(deadline=2.0, on_timeout="block")
    assert cfg.hooks["BEFORE_BRIDGE_VIDEO"] == HookConfig()
    assert cfg.sources == {"cam1": SourceConfig(fps=25.0)}


def test_an_empty_sources_table_leaves_no_sources():
    assert loads("[sources]", env={}).sources == {}


# --- the environment ------------------------------------------------------------------------------------


def test_env_overrides_a_nested_key_over_the_file():
    cfg = loads("[hub]\nheartbeat_interval = 2.0\nstale_after = 9", env={"EDGEROOM_HUB__HEARTBEAT_INTERVAL": "0.5"})
    assert cfg.hub.heartbeat_interval == 0.5
    assert cfg.hub.stale_after == 9.0
    assert loads("", env={"EDGEROOM_BUS__PREFIX": "x"}).bus.prefix == "x"
    assert loads("", env={"EDGEROOM_CONTROL__MAX_MESSAGE_BYTES": "4096"}).control.max_message_bytes == 4096


def test_env_overrides_dynamic_table_keys_case_insensitively():
    env = {
        "EDGEROOM_SERVICES__CAPTURE__WATCHDOG_SEC": "3",
        "EDGEROOM_HOOKS__BEFORE_BRIDGE_VIDEO__DEADLINE": "1",
        "EDGEROOM_HOOKS__ON_VISION_RESULT__ON_TIMEOUT": "block",
        "EDGEROOM_SOURCES__CAM_1__FPS": "25",
    }
    cfg = loads("[sources.cam_1]\nwidth = 640\nheight = 480", env=env)
    assert cfg.services["capture"].watchdog_sec == 3.0
    assert cfg.hooks == {"BEFORE_BRIDGE_VIDEO": HookConfig(1.0, "allow"), "ON_VISION_RESULT": HookConfig(2.0, "block")}
    assert cfg.sources == {"cam_1": SourceConfig(width=640, height=480, fps=25.0)}


def test_env_may_add_a_source_but_no_service():
    cfg = loads("", env={"EDGEROOM_SOURCES__CAM2__WIDTH": "640"})
    assert cfg.sources == {"synthetic": SourceConfig(), "cam2": SourceConfig(width=640)}
    e = env_error({"EDGEROOM_SERVICES__TELEPORTER__ENABLED": "true"})
    assert str(e) == ("env EDGEROOM_SERVICES__TELEPORTER__ENABLED: services.teleporter: "
                      "unknown key (known: hub, capture, rtp, sip, webrtc, decode, vision, avatar, encode, recorder, "
                      "bridge, mcp)")
    # every service has its table: the environment can switch one off without the file
    assert loads("", env={"EDGEROOM_SERVICES__VISION__ENABLED": "false"}).services["vision"].enabled is False
    assert loads("[services.vision]", env={"EDGEROOM_SERVICES__VISION__NICE": "5"}).services["vision"].nice == 5


def test_an_added_source_of_another_kind_takes_that_kinds_keys_from_the_environment():
    cfg = loads("", env={"EDGEROOM_SOURCES__DOOR__KIND": "url", "EDGEROOM_SOURCES__DOOR__URL": "rtsp://cam/1",
                         "EDGEROOM_SOURCES__DOOR__READ_TIMEOUT": "2"})
    assert (cfg.sources["door"].kind, cfg.sources["door"].read_timeout) == ("url", 2.0)
    e = env_error({"EDGEROOM_SOURCES__DOOR__KIND": "url", "EDGEROOM_SOURCES__DOOR__URL": "rtsp://cam/1",
                   "EDGEROOM_SOURCES__DOOR__WIDTH": "640"})
    assert e.key == "sources.door.width" and e.reason.startswith("unknown key of a url source")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("YES", True), ("on", True), ("1", True),
                                             ("False", False), ("no", False), ("OFF", False), ("0", False)])
def test_env_booleans(text, value):
    assert loads("", env={"EDGEROOM_SERVICES__HUB__ENABLED": text}).services["hub"].enabled is value


def test_env_bad_value_names_the_variable_and_the_key():
    e = env_error({"EDGEROOM_HUB__HEARTBEAT_INTERVAL": "fast"})
    assert str(e) == "env EDGEROOM_HUB__HEARTBEAT_INTERVAL: hub.heartbeat_interval: expected a number, got 'fast'"
    assert (e.source, e.key) == ("env EDGEROOM_HUB__HEARTBEAT_INTERVAL", "hub.heartbeat_interval")
    e = env_error({"EDGEROOM_SERVICES__HUB__ENABLED": "maybe"})
    assert "EDGEROOM_SERVICES__HUB__ENABLED" in str(e) and e.key == "services.hub.enabled"
    assert env_error({"EDGEROOM_SOURCES__SYNTHETIC__WIDTH": "640.0"}).reason == "expected an integer, got '640.0'"


def test_env_value_out_of_bounds_names_the_variable():
    e = env_error({"EDGEROOM_SERVICES__CAPTURE__WATCHDOG_SEC": "0.1"})
    assert str(e) == ("env EDGEROOM_SERVICES__CAPTURE__WATCHDOG_SEC: services.capture.watchdog_sec: "
                      "must be >= 0.2, got 0.1; 0 turns it off")


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("EDGEROOM_X__Y", "x"),
        ("EDGEROOM_HUB__HEARTBEAT", "hub.heartbeat"),
        ("EDGEROOM_SERVICES__CAPTURE__WATCHDOG", "services.capture.watchdog"),
        ("EDGEROOM_HOOKS__ON_AUDIO__DEADLINE", "hooks.on_audio"),
        ("EDGEROOM_SERVICES__ENABLED", "services"),
        ("EDGEROOM_SOURCES__-X__FPS", "sources.-x"),
    ],
)
def test_env_variable_that_names_no_key_is_rejected(var, key):
    e = env_error({var: "1"})
    assert e.source == f"env {var}"
    assert e.key == key
    assert str(e).startswith(f"env {var}: {key}: ")


def test_env_without_double_underscore_is_not_config():
    env = {"EDGEROOM_CONFIG": "", "EDGEROOM_BUS_PREFIX": "not valid!", "EDGEROOM_FRAMEBUS_PURE": "1",
           "EDGEROOM_EXTRAS": "x", "OTHER__THING": "1"}
    assert loads("", env=env) == defaults()


def test_env_config_names_the_file_when_no_path_is_given(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text("[log]\nlevel = 'debug'\n")
    assert load(env={"EDGEROOM_CONFIG": str(path)}).log.level == "debug"
    other = tmp_path / "other.toml"
    other.write_text("[log]\nlevel = 'error'\n")
    assert load(other, env={"EDGEROOM_CONFIG": str(path)}).log.level == "error"
    assert load(env={"EDGEROOM_CONFIG": ""}) == defaults()


def test_load_defaults_to_os_environ(tmp_path, monkeypatch):
    path = tmp_path / "box.toml"
    path.write_text("[log]\nformat = 'json'\n")
    monkeypatch.setenv("EDGEROOM_CONFIG", str(path))
    monkeypatch.setenv("EDGEROOM_LOG__LEVEL", "warning")
    cfg = load()
    assert (cfg.log.format, cfg.log.level) == ("json", "warning")


# --- files -------------------------------------------------------------------------------------------


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text("[hub]\nheartbeat_interval = 0.01\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value) == f"{path}: hub.heartbeat_interval: must be >= 0.05, got 0.01"
    assert info.value.source == str(path)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text("[hub]\nheartbeat_interval = 1.0\nstale_after 5.0\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message
    assert info.value.key is None


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing, env={})
    assert str(info.value) == f"{missing}: cannot read the file: No such file or directory"
    with pytest.raises(ConfigError) as info:
        load(env={"EDGEROOM_CONFIG": str(missing)})
    assert info.value.source == str(missing)
    with pytest.raises(ConfigError, match="Is a directory"):
        load(tmp_path, env={})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary, env={})


def test_config_error_is_a_value_error_with_key_and_source():
    e = error("[log]\nlevel = 'loud'")
    assert isinstance(e, ValueError)
    assert (e.key, e.source) == ("log.level", "<string>")
    assert str(ConfigError("bad")) == "bad"
    assert str(ConfigError("bad", key="a.b")) == "a.b: bad"
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), str(again), again.key, again.source) == (ConfigError, str(e), e.key, e.source)


# --- diff ---------------------------------------------------------------------------------------------


def test_diff_reports_live_and_restart_changes():
    old = defaults()
    new = loads("[bus]\nprefix = 'box2'\n[hub]\nheartbeat_interval = 2.0\nstale_after = 6.0\n"
                "[services.capture]\nnice = 5\nrestart = 'always'\n[sources.synthetic]\n[sources.cam1]\n", env={})
    assert diff(old, new) == [
        Change("bus.prefix", "edgeroom", "box2", False),
        Change("hub.heartbeat_interval", 1.0, 2.0, False),
        Change("hub.stale_after", 5.0, 6.0, True),
        Change("services.capture.restart", "on-failure", "always", True),
        Change("services.capture.nice", 0, 5, False),
        Change("sources.cam1", None, asdict(SourceConfig()), False),
    ]
    assert diff(new, old)[-1] == Change("sources.cam1", asdict(SourceConfig()), None, False)
    assert diff(old, defaults()) == []


def test_diff_changed_service_and_source_field_and_kind():
    new = loads("[services.vision]\nnice = 3\n[sources.synthetic]\nfps = 15", env={})
    assert diff(defaults(), new) == [
        Change("services.vision.nice", 0, 3, False),
        Change("sources.synthetic.fps", 30.0, 15.0, False),
    ]
    other = loads("[sources.synthetic]\nkind = 'file'\npath = '/x.mp4'", env={})
    (change,) = diff(defaults(), other)
    assert (change.key, change.old["kind"], change.new["kind"], change.live) == ("sources.synthetic", "synthetic",
                                                                                "file", False)


# --- parsers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("512", 512), ("4K", 4096), ("512M", 536870912),
                                             ("2G", 2 * 1024**3), ("1T", 1024**4)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "512m", "1.5G", "-1", "512 M", "M", "512MB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError) as info:
        parse_bytes(bad)
    assert str(info.value) == (
        f"expected a size in bytes with an optional K, M, G or T suffix, like '512M'; got {bad!r}")


@pytest.mark.parametrize(("text", "value"), [("127.0.0.1:9750", ("127.0.0.1", 9750)), ("box.local:0", ("box.local", 0)),
                                             ("[::1]:65535", ("::1", 65535)), ("*:80", ("*", 80))])
def test_parse_host_port(text, value):
    assert parse_host_port(text) == value


def test_parse_host_port_messages():
    with pytest.raises(ValueError) as info:
        parse_host_port("::1:80")
    assert str(info.value) == "expected HOST:PORT (an IPv6 host in brackets, like [::1]:9750), got '::1:80'"
    with pytest.raises(ValueError) as info:
        parse_host_port("host:70000")
    assert str(info.value) == "port must be 0..65535, got 70000"
    for bad in ["", "host", ":80", "host:", "[]:80", "host:8o"]:
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_host_port(bad)


def test_an_installed_box_config_is_the_default_when_no_env_names_one(tmp_path, monkeypatch):
    from services.runtime import config as configuration

    installed = tmp_path / "edgeroom.toml"
    installed.write_text("[box]\nname = 'installed'\n")
    monkeypatch.setattr(configuration, "SYSTEM_CONFIG", str(installed))
    assert configuration.load(None, env={}).box.name == "installed"
    other = tmp_path / "other.toml"
    other.write_text("[box]\nname = 'other'\n")
    assert configuration.load(None, env={"EDGEROOM_CONFIG": str(other)}).box.name == "other"
    monkeypatch.setattr(configuration, "SYSTEM_CONFIG", str(tmp_path / "absent.toml"))
    assert configuration.load(None, env={}).box.name == "edgeroom"
