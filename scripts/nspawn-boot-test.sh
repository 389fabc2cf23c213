#!/usr/bin/env bash
# Boot edgeroom's units under a real systemd, in an isolated root, and check what systemd
# does with them: edgeroom.target starts and every unit reports READY=1; a SIGKILLed
# capture is restarted; a hung capture (SIGSTOP) is killed by the watchdog and restarted;
# the hub answers `edgeroom ctl status` inside the box.
#
# Safety: systemd never shares this machine's root or /tmp. The root is a debootstrapped
# Debian 12 under $EDGEROOM_NSPAWN_DIR (default /var/tmp/edgeroom-nspawn), booted by
# systemd-nspawn with its own network namespace (loopback only).
#
# Needs root, debootstrap, systemd-container (systemd-nspawn) and access to a Debian mirror
# and PyPI. Exit 0: all checks passed; 1: a check failed; 2: this machine cannot run it
# (the reason is printed).
#
# On the build machine (Debian 12 in a container whose PID 1 is not systemd, /run on the
# root ext4, cgroup v1 hierarchy) two obstacles needed a workaround, both applied below:
#   - `systemd-nspawn` registers with machined and allocates a scope over the system bus,
#     which does not exist without systemd as PID 1: `--register=no --keep-unit`;
#   - it refuses to clean its propagation directory unless /run/systemd/nspawn is a tmpfs:
#     a private tmpfs is mounted there for the run and unmounted after.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${EDGEROOM_NSPAWN_DIR:-/var/tmp/edgeroom-nspawn}"
ROOT="$DIR/root"
MIRROR="${EDGEROOM_NSPAWN_MIRROR:-http://deb.debian.org/debian}"
NSPAWN=(systemd-nspawn --register=no --keep-unit -q -D "$ROOT")
BOOT_PID=""
MOUNTED=""

say() { echo "nspawn-test: $*"; }
cannot() { say "cannot run here: $*"; exit 2; }
fail() { say "FAIL: $*"; exit 1; }

cleanup() {
    if [ -n "$BOOT_PID" ] && kill -0 "$BOOT_PID" 2>/dev/null; then
        in_box systemctl poweroff >/dev/null 2>&1 || kill -TERM "$BOOT_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$BOOT_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$BOOT_PID" 2>/dev/null || true
    fi
    [ -z "$MOUNTED" ] || umount /run/systemd/nspawn 2>/dev/null || true
}
trap cleanup EXIT

preflight() {
    [ "$(id -u)" = 0 ] || cannot "needs root"
    command -v systemd-nspawn >/dev/null || cannot "systemd-nspawn missing (apt-get install systemd-container)"
    command -v debootstrap >/dev/null || cannot "debootstrap missing (apt-get install debootstrap)"
    mkdir -p /run/systemd/nspawn
    if [ "$(findmnt -n -o FSTYPE /run/systemd/nspawn || true)" != tmpfs ]; then
        mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn || cannot "cannot mount a tmpfs on /run/systemd/nspawn"
        MOUNTED=1
    fi
}

make_root() {
    if [ ! -x "$ROOT/usr/lib/systemd/systemd" ]; then
        say "debootstrap Debian 12 into $ROOT (about a minute)"
        mkdir -p "$DIR"
        debootstrap --variant=minbase \
            --include=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps \
            bookworm "$ROOT" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
            || cannot "debootstrap failed (network or mirror?): see $DIR/debootstrap.log"
    fi
    "${NSPAWN[@]}" --pipe /bin/true || cannot "systemd-nspawn cannot start a container here"
}

host_pip() {
    # pip inside the root uses the host's pip settings and trust store (a proxy with its own CA,
    # local wheel mirrors), read-only; the container keeps its own network namespace only when booted
    HOST_PIP=()
    local var path
    for var in PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS SSL_CERT_FILE; do
        [ -n "${!var:-}" ] && HOST_PIP+=(--setenv="$var=${!var}")
    done
    for path in /etc/pip.conf /etc/ssl/certs/ca-certificates.crt "${PIP_CERT:-}" /opt/wheels /opt/pypi /opt/pypi-more; do
        [ -n "$path" ] && [ -e "$path" ] && HOST_PIP+=(--bind-ro="$path")
    done
    return 0
}

install_edgeroom() {
    host_pip
    say "install edgeroom into the root with scripts/install.sh"
    rm -rf "$ROOT/src/edgeroom" "$ROOT"/etc/edgeroom/edgeroom.toml* && mkdir -p "$ROOT/src/edgeroom"
    (cd "$REPO" && git ls-files -z | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$ROOT/src/edgeroom"
    "${NSPAWN[@]}" "${HOST_PIP[@]}" --pipe /src/edgeroom/scripts/install.sh --extras media --platform cpu \
        > "$DIR/install.log" 2>&1 \
        || fail "install.sh failed inside the root: see $DIR/install.log"
    # a short watchdog and restart delay so the test is quick; the units are rendered again from it
    sed -i 's/^\[services\.capture\]$/[services.capture]\nwatchdog_sec = 3.0\nrestart_sec = 1.0/' \
        "$ROOT/etc/edgeroom/edgeroom.toml"
    grep -q '^watchdog_sec = 3.0$' "$ROOT/etc/edgeroom/edgeroom.toml" || fail "could not set the test's watchdog"
    "${NSPAWN[@]}" --pipe /opt/edgeroom/venv/bin/edgeroom units render --out /etc/systemd/system >/dev/null \
        || fail "units render failed inside the root"
}

leader() {  # the container's PID 1 (systemd), a child of systemd-nspawn
    local pid
    for pid in $(pgrep -P "$BOOT_PID" || true) $(pgrep -P "$(pgrep -P "$BOOT_PID" | head -1)" 2>/dev/null || true); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then echo "$pid"; return 0; fi
    done
    return 1
}

in_box() { nsenter --target "$(leader)" --all -- "$@"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what="$2"; shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 0.5
    done
}

watchdog_logged() { local out; out="$(in_box journalctl -u "$1" --no-pager -q)"; grep -q "Watchdog timeout" <<<"$out"; }
scrape() {
    in_box /opt/edgeroom/venv/bin/python -c \
        'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9750/metrics").read().decode())'
}
# Output is read whole and every grep reads a string, never a pipe: under pipefail, a grep -q that
# exits at its first match fails a producer still writing (SIGPIPE, 141). The journal's JSON lines
# are over 1 KB each: with the five "ready (pid" lines, grep -F wrote twice, and the check failed
# whenever grep -q had quit in between (2 boots in 5).
exits_counted() {
    local out; out="$(scrape | grep -E '^edgeroom_service_exits_total\{' | grep -F "result=\"$1\"" || true)"
    grep -q ' 1.0$' <<<"$out"
}
journal_has() {  # journal_has UNIT PRIORITY TEXT: an entry of that priority whose message has TEXT
    local out; out="$(in_box journalctl -u "$1" -o json --no-pager | grep -F "$3" || true)"
    grep -q "\"PRIORITY\":\"$2\"" <<<"$out"
}
prop() { in_box systemctl show -p "$2" --value "$1"; }
restarts_at_least() { [ "$(prop "$1" NRestarts)" -ge "$2" ] && [ "$(prop "$1" ActiveState)" = active ]; }

boot_and_check() {
    say "boot the root (its own network namespace)"
    "${NSPAWN[@]}" -b --private-network > "$DIR/boot.log" 2>&1 &
    BOOT_PID=$!
    wait_for 60 "the container's systemd" leader
    wait_for 90 "edgeroom.target active" in_box systemctl is-active edgeroom.target
    local cap=edgeroom-capture@synthetic.service
    wait_for 60 "hub and capture active" in_box systemctl is-active edgeroom-hub.service "$cap"
    # the vision service (no pipelines by default) and the recorder (nothing to record yet) idle, up
    wait_for 60 "vision and recorder active" in_box systemctl is-active edgeroom-vision.service \
        edgeroom-recorder.service
    say "started: $(in_box systemctl is-active edgeroom-hub.service "$cap" edgeroom-vision.service \
        edgeroom-recorder.service | tr '\n' ' ')"
    wait_for 30 "edgeroom ctl status inside the box" \
        in_box runuser -u edgeroom -- /opt/edgeroom/venv/bin/edgeroom ctl status
    # logs under journald: one entry per event, the <N> prefix turned into the entry's priority
    wait_for 10 "the hub's ready line in the journal at priority info" journal_has edgeroom-hub.service 6 "ready (pid"
    local messages; messages="$(in_box journalctl -u edgeroom-hub.service -o cat --no-pager)"
    if grep -q '^<[0-7]>' <<<"$messages"; then fail "a <N> prefix reached the journal's message text"; fi
    say "journal: $(grep -m1 'ready (pid' <<<"$messages")"
    in_box runuser -u edgeroom -- /opt/edgeroom/venv/bin/edgeroom ctl status

    local pid; pid="$(prop "$cap" MainPID)"
    say "SIGKILL capture (pid $pid)"
    in_box kill -KILL "$pid"
    wait_for 30 "systemd to restart capture after SIGKILL" restarts_at_least "$cap" 1
    say "restarted: pid $(prop "$cap" MainPID), NRestarts $(prop "$cap" NRestarts)"

    pid="$(prop "$cap" MainPID)"
    say "SIGSTOP capture (pid $pid): its loop stops pinging the watchdog"
    in_box kill -STOP "$pid"
    wait_for 60 "the watchdog to kill and systemd to restart capture" restarts_at_least "$cap" 2
    wait_for 15 "systemd's watchdog timeout in the journal" watchdog_logged "$cap"
    say "watchdog restart: pid $(prop "$cap" MainPID), NRestarts $(prop "$cap" NRestarts)"
    # each unit's ExecStopPost told the hub how its process ended: on the scrape URL
    wait_for 15 "the watchdog kill on the scrape URL" exits_counted watchdog
    exits_counted signal || fail "the SIGKILL is not on the scrape URL"
    say "scrape URL: $(scrape | grep '^edgeroom_service_exits_total' | tr '\n' ' ')"

    # a source added by command: the hub writes sources.json, the path unit runs `edgeroom sources sync`
    local ctl=(runuser -u edgeroom -- /opt/edgeroom/venv/bin/edgeroom ctl)
    say "ctl source add extra: its capture unit must start"
    in_box "${ctl[@]}" source add extra kind=synthetic encode=raw width=160 height=120 fps=5
    wait_for 30 "edgeroom-capture@extra active after ctl source add" \
        in_box systemctl is-active edgeroom-capture@extra.service
    in_box "${ctl[@]}" source list
    say "ctl source remove extra: its capture unit must stop"
    in_box "${ctl[@]}" source remove extra
    wait_for 30 "edgeroom-capture@extra stopped after ctl source remove" \
        bash -c "! nsenter --target $(leader) --all -- systemctl is-active -q edgeroom-capture@extra.service"
    # the recorder writes under the state directory through its hardened unit (ProtectSystem=strict)
    say "ctl record start synthetic: a recording must appear under /var/lib/edgeroom/recordings"
    in_box "${ctl[@]}" record start synthetic
    wait_for 30 "a recording being written" \
        in_box bash -c 'ls /var/lib/edgeroom/recordings/synthetic/*.mp4.partial'
    in_box "${ctl[@]}" record stop synthetic
    wait_for 15 "the recording finished" in_box bash -c 'ls /var/lib/edgeroom/recordings/synthetic/*.mp4'
    say "recorded: $(in_box bash -c 'ls -l /var/lib/edgeroom/recordings/synthetic/' | tail -n +2 | tr '\n' ' ')"
    say "ok: start, SIGKILL restart, watchdog restart, sources added and removed by command, a recording, under a real systemd"
}

preflight
make_root
install_edgeroom
boot_and_check
