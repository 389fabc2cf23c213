"""Where recordings go on disk: names, the rule for files being written, leftovers, retention.

Layout: `DIR/TARGET/TARGET-YYYYmmddTHHMMSSZ.mp4` (`.wav` for an audio target), one folder
per target (a stream name, or `room-NAME` for the target `room:NAME`), the time the
segment began in UTC, with `-1`, `-2`, ... when two segments begin in the same second
(a resolution change).

The rule for files being written: a segment is written as `NAME.mp4.partial` and renamed
to `NAME.mp4` when it is complete (closed cleanly, or cut by a full disk); the same for
`.wav`. So `*.mp4` and `*.wav` are always finished, and anything that copies or uploads
recordings can ignore `*.partial`. A `.partial` left by a crash (SIGKILL, power cut) is
handled at start by `recover()`: cut back to its last whole resume state (mp4.repair; a
WAV: wav.repair, its header's sizes set to what its state chunk vouches for), renamed
when it holds media, deleted when it does not; or, when its target records on, kept
(repaired) for the recorder to continue (`keep`), whichever kind it is. `last_state()`
finds where a target's recording ended: the resume state of its newest file (MP4 or
WAV) that holds any.

Retention (`sweep()`), run at start, once a minute and after each segment: delete
finished segments older than `retention_hours`, then the oldest finished segments while
all of them together take more than `max_disk_share` of the filesystem. A `.partial` is
never deleted: the file being written stays.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.recorder import mp4, wav

REPAIR = {"mp4": mp4.repair, "wav": wav.repair}  # the kinds of segment, and how a crash's leftover is made whole
READ_STATE = {"mp4": mp4.read_state, "wav": wav.read_state}  # and where a file's recording ended

__all__ = ["PARTIAL", "Recovered", "finish", "folder", "free_bytes", "last_state", "new_path", "newest_partial",
           "recover", "sweep"]

log = logging.getLogger("edgeroom.recorder")

PARTIAL = ".partial"


def folder(root: Path, target: str) -> Path:
    """The folder of a target's segments ('room:lobby' -> ROOT/room-lobby)."""
    return root / target.replace(":", "-").replace("/", "_")


def new_path(root: Path, target: str, wall: float | None = None, ext: str = "mp4") -> Path:
    """A fresh `.partial` path for a segment of `target` beginning now (or at `wall`); `ext`:
    mp4, or wav for an audio target."""
    d = folder(root, target)
    d.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if wall is None else wall))
    base = f"{d.name}-{stamp}"
    for n in range(1000):
        name = base if n == 0 else f"{base}-{n}"
        path = d / f"{name}.{ext}{PARTIAL}"
        if not path.exists() and not (d / f"{name}.{ext}").exists():
            return path
    raise FileExistsError(f"no free segment name for {base} in {d}")


def finish(partial: Path) -> Path:
    """Rename a completed `.partial` to its final `.mp4` name (and make the rename durable)."""
    final = partial.with_name(partial.name[: -len(PARTIAL)]) if partial.name.endswith(PARTIAL) else partial
    os.replace(partial, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Recovered:
    kept: list[Path]     # repaired and renamed to .mp4 / .wav
    removed: list[Path]  # held no media
    continued: list[Path] = field(default_factory=list)  # repaired, left .partial to continue


def recover(root: Path, keep: set[Path] | frozenset[Path] = frozenset()) -> Recovered:
    """Handle the `.partial` files a crash left under `root` (call before recording starts):
    repaired, then renamed, or deleted when they hold no media; those in `keep` that hold
    media stay `.partial` (the recorder continues them)."""
    out = Recovered([], [])
    if not root.is_dir():
        return out
    for partial in sorted(p for ext in REPAIR for p in root.rglob(f"*.{ext}{PARTIAL}")):
        try:
            ext = _kind(partial)
            size = REPAIR[ext](partial)
            if size == 0 or (ext == "mp4" and not mp4.has_fragments(partial)):
                partial.unlink()
                out.removed.append(partial)
            elif partial in keep:
                out.continued.append(partial)
            else:
                out.kept.append(finish(partial))
        except OSError as exc:
            log.warning("could not recover %s: %s", partial, exc)
    return out


def last_state(root: Path, target: str) -> tuple[dict | None, Path | None]:
    """The resume state of the target's newest file that has a position (and that file)."""
    d = folder(root, target)
    if not d.is_dir():
        return None, None
    files = []
    for p in (p for ext in READ_STATE for pattern in (f"*.{ext}", f"*.{ext}{PARTIAL}") for p in d.glob(pattern)):
        try:
            files.append((p.stat().st_mtime_ns, p))
        except OSError:
            continue
    for _, p in sorted(files, reverse=True)[:4]:  # a header-only newest file says nothing: the one before
        doc = READ_STATE[_kind(p)](p)
        tracks = (doc or {}).get("tracks") or []
        if tracks and any(t.get("tok") is not None or t.get("end") is not None for t in tracks):
            return doc, p
    return None, None


def newest_partial(root: Path, target: str) -> Path | None:
    """The target's `.partial` written last (what a crash cut), if any."""
    d = folder(root, target)
    found = [(p.stat().st_mtime_ns, p) for ext in REPAIR for p in d.glob(f"*.{ext}{PARTIAL}")] if d.is_dir() else []
    return max(found)[1] if found else None


def _kind(path: Path) -> str:
    """mp4 or wav, of a segment's name (finished or `.partial`)."""
    name = path.name[: -len(PARTIAL)] if path.name.endswith(PARTIAL) else path.name
    return name.rpartition(".")[2]


def sweep(root: Path, *, max_age_s: float = 0.0, max_share: float = 0.0, now: float | None = None) -> list[Path]:
    """Delete finished segments older than `max_age_s` (0: no age limit), then the oldest while
    all finished segments take more than `max_share` (0: no limit) of the filesystem's size.
    Never touches a `.partial`. Returns what it deleted."""
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    files = []
    for p in (p for ext in REPAIR for p in root.rglob(f"*.{ext}")):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    files.sort()
    deleted: list[Path] = []
    keep = []
    for mtime, size, p in files:
        if max_age_s > 0 and now - mtime > max_age_s and _unlink(p):
            deleted.append(p)
        else:
            keep.append((mtime, size, p))
    if max_share > 0:
        st = os.statvfs(root)
        limit = max_share * st.f_blocks * st.f_frsize
        total = sum(size for _, size, _ in keep)
        for _, size, p in keep:
            if total <= limit:
                break
            if _unlink(p):
                deleted.append(p)
                total -= size
    return deleted


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except OSError as exc:
        log.warning("retention could not delete %s: %s", p, exc)
        return False


def free_bytes(path: Path) -> tuple[int, int]:
    """(bytes free for us, filesystem size) of the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
