"""The box's V4L2 cameras, without OpenCV and without waiting on any of them.

    >>> list_cameras()
    [{"device": "/dev/video0", "index": 0, "name": "HD Webcam C525", "driver": "uvcvideo",
      "bus": "usb-0000:00:14.0-1", "capture": True, "error": "", "node": 0},
     {"device": "/dev/video1", "index": 1, "name": "HD Webcam C525", "driver": "uvcvideo",
      "bus": "usb-0000:00:14.0-1", "capture": False, "error": "", "node": 1}]

    python -m services.capture.cameras [--json]

Two places are read, nothing else is touched:

* `/sys/class/video4linux/videoN/name`: the kernel's name for each node (readable by
  anyone, so a camera whose node we may not open is still listed by name), and `index`:
  which node of its device this is (the row's `node`; None without sysfs).
* `/dev/videoN`: opened O_RDONLY|O_NONBLOCK (a V4L2 open never waits for a frame; nothing
  is configured, nothing streams, so a camera in use by another program answers too) and
  asked VIDIOC_QUERYCAP with `fcntl.ioctl`: driver, card, bus_info and the capabilities.

`capture` is True when the node itself can capture video (V4L2_CAP_VIDEO_CAPTURE or its
multi-planar form, read from `device_caps` when the driver fills it, as every driver
since Linux 4.x does). A UVC camera has two nodes: the video one, and a metadata node
(V4L2_CAP_META_CAPTURE only), which is listed with capture False so that nobody points a
source at it. `index` is N of /dev/videoN: what a webcam source's `device = "N"` means.
A node that could not be queried keeps its row, with `error` saying why (EACCES names
the video group, EPERM a device policy such as systemd's DeviceAllow=; a file that is
not a V4L2 device is ENOTTY) — one bad node never hides the others or raises. The name
then comes from sysfs alone, the driver and bus stay "".

No cameras, no /sys/class/video4linux (a container, a box without V4L2): [] at once.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import struct
import sys

__all__ = ["CAP_META_CAPTURE", "CAP_VIDEO_CAPTURE", "CAP_VIDEO_CAPTURE_MPLANE", "VIDIOC_QUERYCAP", "list_cameras",
           "main", "querycap"]

SYSFS = "/sys/class/video4linux"
DEV = "/dev"

# struct v4l2_capability (linux/videodev2.h): driver[16] card[32] bus_info[32] version capabilities
# device_caps reserved[3]
_CAPABILITY = struct.Struct("=16s32s32sIII12x")
assert _CAPABILITY.size == 104


def _ior(kind: str, nr: int, size: int) -> int:
    """The _IOR(kind, nr, size) request number of linux/ioctl.h (asm-generic layout: x86, arm, aarch64)."""
    return (2 << 30) | (size << 16) | (ord(kind) << 8) | nr


VIDIOC_QUERYCAP = _ior("V", 0, _CAPABILITY.size)  # 0x80685600
CAP_VIDEO_CAPTURE = 0x00000001
CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
CAP_META_CAPTURE = 0x00800000
CAP_DEVICE_CAPS = 0x80000000

_NODE = re.compile(r"^video(\d+)$")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def querycap(path: str) -> dict:
    """VIDIOC_QUERYCAP on `path`: {driver, card, bus, capabilities, capture}; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        buf = bytearray(_CAPABILITY.size)
        fcntl.ioctl(fd, VIDIOC_QUERYCAP, buf, True)
    finally:
        os.close(fd)
    driver, card, bus, _version, caps, device_caps = _CAPABILITY.unpack(buf)
    node_caps = device_caps if caps & CAP_DEVICE_CAPS else caps
    return {"driver": _text(driver), "card": _text(card), "bus": _text(bus), "capabilities": node_caps,
            "capture": bool(node_caps & (CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE))}


def explain(exc: OSError, path: str) -> str:
    """Why a node could not be opened or queried, in words an operator can act on."""
    code = exc.errno
    if code == errno.EACCES:
        return (f"permission denied opening {path}: add the user to the video group "
                f"(sudo usermod -aG video $USER, then log in again)")
    if code == errno.EPERM:  # a device cgroup (systemd DeviceAllow=, a container) refuses, whatever the group
        return (f"permission denied opening {path} (EPERM: a device policy such as systemd's DeviceAllow= or "
                f"the container forbids it; the video group alone does not help)")
    if code == errno.ENOENT:
        return f"no device node {path} (the kernel lists it, but udev has not made the node or /dev is not shared)"
    if code == errno.ENOTTY:
        return f"{path} is not a V4L2 device (VIDIOC_QUERYCAP: {os.strerror(code)})"
    if code in (errno.ENODEV, errno.ENXIO):
        return f"{path} is gone (unplugged?): {os.strerror(code)}"
    return f"{path}: {os.strerror(code) if code else exc}"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _numbers(root: str) -> dict[int, str]:
    """{N: name} for the videoN entries under `root`."""
    try:
        names = os.listdir(root)
    except OSError:
        return {}
    return {int(m.group(1)): n for n in names if (m := _NODE.match(n))}


def list_cameras(sysfs: str = SYSFS, dev: str = DEV) -> list[dict]:
    """Every /dev/videoN the kernel lists (sysfs) or /dev holds, by N; see the module doc."""
    in_sysfs = _numbers(sysfs)
    in_dev = _numbers(dev)
    rows = []
    for n in sorted(set(in_sysfs) | set(in_dev)):
        path = os.path.join(dev, f"video{n}")
        entry = os.path.join(sysfs, in_sysfs[n]) if n in in_sysfs else ""
        name = _read(os.path.join(entry, "name")) if entry else ""
        node = _read(os.path.join(entry, "index")) if entry else ""
        row = {"device": path, "index": n, "name": name, "driver": "", "bus": "", "capture": False, "error": "",
               "node": int(node) if node.isdigit() else None}
        try:
            cap = querycap(path)
        except OSError as exc:
            row["error"] = explain(exc, path)
        else:
            row.update(driver=cap["driver"], bus=cap["bus"], capture=cap["capture"], name=name or cap["card"])
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return "no V4L2 devices (nothing under /sys/class/video4linux or /dev/video*)"
    head = ("DEVICE", "NAME", "DRIVER", "BUS", "CAPTURE", "ERROR")
    body = [(r["device"], r["name"] or "-", r["driver"] or "-", r["bus"] or "-",
             "yes" if r["capture"] else "no", r["error"]) for r in rows]
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head) - 1)]
    lines = []
    for cells in (head, *body):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.capture.cameras",
                                 description="List the V4L2 video devices and which of them can capture.")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--sysfs", default=SYSFS, help=argparse.SUPPRESS)
    ap.add_argument("--dev", default=DEV, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = list_cameras(args.sysfs, args.dev)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
