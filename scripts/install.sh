#!/usr/bin/env bash
# Install edgeroom on a box as a systemd appliance, or remove it (--uninstall).
#
#   sudo ./scripts/install.sh                  # detect the box, install, enable, start
#   sudo ./scripts/install.sh --dry-run        # say what it would do, change nothing
#   sudo ./scripts/install.sh --root /mnt/img  # install into an image or scratch root
#   sudo ./scripts/install.sh --uninstall [--purge]
#
# What it lays down: the user and group edgeroom (systemd-sysusers), a virtual environment
# PREFIX/venv with this repository installed into it, /etc/edgeroom/edgeroom.toml (never
# overwritten), /var/lib/edgeroom, the units `edgeroom units render` makes in
# /etc/systemd/system, edgeroom.target enabled, and PREFIX/install-manifest.txt listing all
# of it. Every action is printed as one "install: ..." line before it is done; running it
# again changes nothing that is already right.
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACCOUNT=edgeroom
CONF=/etc/edgeroom/edgeroom.toml
STATE=/var/lib/edgeroom
UNITDIR=/etc/systemd/system
SYSUSERS=/usr/lib/sysusers.d/edgeroom.conf
WANTS=$UNITDIR/multi-user.target.wants
ACCOUNT_DB=(passwd group shadow gshadow .pwd.lock)
RENDER_MARK="Rendered by \`edgeroom units render\`"
JETSON_INDEX_JP6=https://pypi.jetson-ai-lab.io/jp6/cu126
JETSON_ZOO=https://elinux.org/Jetson_Zoo#ONNX_Runtime

PREFIX=/opt/edgeroom
ROOT=/
DRY_RUN=0
UNINSTALL=0
PURGE=0
ENABLE=1
EXTRAS_OPT=""
PLATFORM_OPT=auto

R=""            # ROOT as a prefix for paths: "" for the real system
TMP=""
PY=""
PLATFORM=""
EXTRAS=""
OWN_UID=""
OWN_GID=""
MANIFEST=()     # paths (inside the root) this run laid down; directories end in /
declare -A PLANNED=()

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

# act DESCRIPTION COMMAND...: print what is about to happen, then do it (not with --dry-run).
act() {
    local what=$1
    shift
    say "$what"
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

quiet() { "$@" >/dev/null; }

try() { "$@" || say "($* failed; going on)"; }

# The venv's edgeroom sees none of the caller's EDGEROOM_* overrides: units and checks
# describe the box as its config file says.
clean_env() { env -i PATH="$PATH" HOME="${HOME:-/root}" LANG=C.UTF-8 "$@"; }

record() { MANIFEST+=("$1"); }

exists() { [ -e "$1" ] || [ -L "$1" ]; }

usage() {
    cat <<EOF
usage: $0 [options]

Install edgeroom as a systemd appliance (user, venv, config, units, enablement).

  --prefix DIR       where the virtual environment goes (default /opt/edgeroom)
  --root DIR         install into this root (an image or scratch directory); every path is
                     prefixed with DIR, systemd is not touched beyond enabling offline
  --dry-run          print every action and change nothing
  --uninstall        remove the units, the prefix, the sysusers file and the enablement;
                     keeps /etc/edgeroom and /var/lib/edgeroom (give the install's --prefix
                     and --root again)
  --purge            with --uninstall: also remove those and the user and group edgeroom
  --extras LIST      extras to install, comma-separated (default: by platform; none: core)
  --platform P       auto, jetson, nvidia or cpu (default auto: detect)
  --no-enable        do not enable (or start) edgeroom.target
  -h, --help         this help
EOF
}

need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }

parse_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
            --prefix=*) PREFIX=${1#*=}; shift ;;
            --root) need_value "$@"; ROOT=$2; shift 2 ;;
            --root=*) ROOT=${1#*=}; shift ;;
            --extras) need_value "$@"; EXTRAS_OPT=$2; shift 2 ;;
            --extras=*) EXTRAS_OPT=${1#*=}; shift ;;
            --platform) need_value "$@"; PLATFORM_OPT=$2; shift 2 ;;
            --platform=*) PLATFORM_OPT=${1#*=}; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            --uninstall) UNINSTALL=1; shift ;;
            --purge) PURGE=1; shift ;;
            --no-enable) ENABLE=0; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
    done
    case "$PLATFORM_OPT" in auto | jetson | nvidia | cpu) ;; *) die "--platform must be auto, jetson, nvidia or cpu" ;; esac
    [ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall"
    case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
    case "$ROOT" in /*) ;; *) ROOT="$PWD/$ROOT" ;; esac
    PREFIX=$(realpath -ms -- "$PREFIX")
    ROOT=$(realpath -ms -- "$ROOT")
    [ "$PREFIX" != / ] || die "--prefix / would put the venv at /venv: give a directory of its own"
    if [ "$ROOT" != / ]; then R=$ROOT; fi
}

# --- detection (always of the real machine, not of the root) -------------------------------

os_field() { sed -n "s/^$1=//p" /etc/os-release 2>/dev/null | tr -d '"' | head -n1; }

is_jetson() {
    [ -e /etc/nv_tegra_release ] && return 0
    [ -r /proc/device-tree/model ] && tr -d '\0' </proc/device-tree/model | grep -q Jetson
}

# The L4T major release (36 is JetPack 6, 35 is JetPack 5), or nothing.
l4t_release() { sed -n '1s/^# R\([0-9]*\) .*/\1/p' /etc/nv_tegra_release 2>/dev/null || true; }

nvidia_gpu() {
    if [ -e /proc/driver/nvidia/version ]; then echo /proc/driver/nvidia/version
    elif [ -e /dev/nvidia0 ]; then echo /dev/nvidia0
    elif command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi -L >/dev/null 2>&1; then echo "nvidia-smi -L"
    fi
}

check_distro() {
    local id like pretty
    id=$(os_field ID)
    like=$(os_field ID_LIKE)
    pretty=$(os_field PRETTY_NAME)
    if [ -e /etc/nv_tegra_release ]; then
        say "distribution: L4T R$(l4t_release) (NVIDIA Jetson Linux) on ${pretty:-unknown}"
        return
    fi
    say "distribution: ${pretty:-unknown (no /etc/os-release)}"
    case " $id $like " in
        *" debian "* | *" ubuntu "*) return ;;
    esac
    if [ -n "$R" ]; then
        say "not Debian, Ubuntu or L4T, but installing into $ROOT: continuing"
    else
        die "this installer supports Debian, Ubuntu and L4T (Jetson); this machine runs ${pretty:-an unknown system}. Install by hand: see README.md"
    fi
}

detect_platform() {
    local arch gpu detected
    arch=$(uname -m)
    say "architecture: $arch"
    gpu=""
    if is_jetson; then
        say "Jetson: yes ($( [ -e /etc/nv_tegra_release ] && echo /etc/nv_tegra_release || echo /proc/device-tree/model))"
        detected=jetson
    else
        say "Jetson: no (no /etc/nv_tegra_release, no Jetson in /proc/device-tree/model)"
        if [ "$arch" = x86_64 ]; then gpu=$(nvidia_gpu); fi
        if [ -n "$gpu" ]; then
            say "NVIDIA GPU: yes ($gpu)"
            detected=nvidia
        elif [ "$arch" != x86_64 ]; then
            say "NVIDIA GPU: not looked for ($arch is neither a Jetson nor x86_64)"
            detected=cpu
        else
            say "NVIDIA GPU: none (no /proc/driver/nvidia/version, no /dev/nvidia0, nvidia-smi -L fails or is absent)"
            detected=cpu
        fi
    fi
    if [ "$PLATFORM_OPT" = auto ]; then
        PLATFORM=$detected
        say "platform: $PLATFORM (detected)"
    else
        PLATFORM=$PLATFORM_OPT
        say "platform: $PLATFORM (from --platform; detected: $detected)"
    fi
}

known_extras() {
    sed -n '/^\[project.optional-dependencies\]/,/^\[/s/^\([a-z0-9-]*\) *=.*/\1/p' "$REPO/pyproject.toml"
}

pick_extras() {
    local e
    if [ -n "$EXTRAS_OPT" ]; then
        EXTRAS=$EXTRAS_OPT
        [ "$EXTRAS" != none ] || EXTRAS=""
        [ -z "$EXTRAS" ] || [[ $EXTRAS =~ ^[a-z0-9-]+(,[a-z0-9-]+)*$ ]] ||
            die "--extras takes names separated by commas, like media,vision (or none)"
        for e in ${EXTRAS//,/ }; do
            known_extras | grep -qx "$e" || die "unknown extra $e; pyproject.toml has: $(known_extras | paste -sd, -)"
        done
        say "extras: ${EXTRAS:-none (core only)} (from --extras)"
    else
        case "$PLATFORM" in
            cpu) EXTRAS=media,vision,ai,webrtc,screen,mcp ;;   # webrtc: aiortc, the calls' RTP (rtp@, sip)
            nvidia) EXTRAS=media,vision-gpu,ai,webrtc,screen,mcp ;;   # screen, mcp: the agent tools
            jetson) EXTRAS=media,ai,webrtc,screen,mcp ;;
        esac
        say "extras: $EXTRAS (for $PLATFORM)"
    fi
    if [ "$PLATFORM" = jetson ]; then
        say "Jetson: PyPI has no onnxruntime-gpu for JetPack; take it from NVIDIA's wheel index for your"
        say "  JetPack (JetPack 6: $JETSON_INDEX_JP6; others: $JETSON_ZOO), after this install:"
        say "  $PREFIX/venv/bin/pip install --extra-index-url $JETSON_INDEX_JP6 onnxruntime-gpu onnx   # onnx: the int8 copy on a CPU fallback"
    fi
}

# --- python -----------------------------------------------------------------------------------

pick_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PY=$("$py" -c 'import sys; print(sys.executable)')
            say "python: $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
            return 0
        fi
    done
    die "edgeroom needs Python >= 3.11 and none is on PATH (Ubuntu 22.04 / JetPack 6: apt-get install python3.11 python3.11-venv)"
}

py_version() { "$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

can_apt() { [ -z "$R" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

ensure_python_tools() {
    local ver
    ver=$(py_version)
    if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        can_apt || die "$PY cannot make virtual environments: install python${ver}-venv first${R:+ (with --root the installer never runs apt-get)}"
        act "apt-get install python${ver}-venv (the venv module is missing)" apt_install "python${ver}-venv"
    fi
    # framebus's memory fences are a small C extension: required on aarch64 (Jetson).
    if [ "$(uname -m)" = aarch64 ] && ! { command -v cc >/dev/null 2>&1 && "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; then
        can_apt || die "on aarch64 framebus needs its C fences: install gcc and python${ver}-dev first"
        act "apt-get install gcc python${ver}-dev (framebus's C fences, required on aarch64)" apt_install gcc "python${ver}-dev"
    fi
}

# --- files, directories, owners ----------------------------------------------------------------

octal() { printf '%o' "$((8#$1))"; }

# fix_attrs PATH MODE UID GID: correct mode and owner of something that already exists.
fix_attrs() {
    local path=$1 mode=$2 uid=$3 gid=$4 have
    exists "$path" || return 0
    have=$(stat -c '%a %u %g' -- "$path")
    if [ "$have" != "$(octal "$mode") $uid $gid" ]; then
        act "set $path to mode $mode, owner $uid:$gid (was $have)" fix_now "$path" "$mode" "$uid" "$gid"
    fi
}

fix_now() { chown "$3:$4" -- "$1" && chmod "$2" -- "$1"; }

# ensure_dir DIR MODE UID GID: DIR (inside the root) and any missing parents (0755, root).
ensure_dir() {
    local dir=$1 mode=$2 uid=$3 gid=$4 parent
    if [ -d "$R$dir" ] || [ -n "${PLANNED[$dir]:-}" ]; then
        [ -n "${PLANNED[$dir]:-}" ] || fix_attrs "$R$dir" "$mode" "$uid" "$gid"
        return 0
    fi
    parent=$(dirname "$dir")
    [ "$parent" = / ] || ensure_dir "$parent" 0755 0 0
    act "create $R$dir (mode $mode, owner $uid:$gid)" install -d -m "$mode" -o "$uid" -g "$gid" "$R$dir"
    PLANNED[$dir]=1
    record "$dir/"
}

# put_file SOURCE PATH MODE UID GID: PATH (inside the root) gets SOURCE's content, unless it has it.
put_file() {
    local src=$1 path=$2 mode=$3 uid=$4 gid=$5
    record "$path"
    if [ -f "$R$path" ] && cmp -s "$src" "$R$path"; then
        say "$R$path is up to date"
        fix_attrs "$R$path" "$mode" "$uid" "$gid"
        return 0
    fi
    act "write $R$path (mode $mode, owner $uid:$gid)" install -m "$mode" -o "$uid" -g "$gid" "$src" "$R$path"
}

# The account's numeric ids as the root's own files have them (works in a scratch root).
account_ids() {
    OWN_UID=$(awk -F: -v n="$ACCOUNT" '$1 == n { print $3 }' "$R/etc/passwd" 2>/dev/null || true)
    OWN_GID=$(awk -F: -v n="$ACCOUNT" '$1 == n { print $3 }' "$R/etc/group" 2>/dev/null || true)
    if [ -z "$OWN_UID" ] || [ -z "$OWN_GID" ]; then
        [ "$DRY_RUN" = 1 ] || die "user or group $ACCOUNT missing from $R/etc/passwd or $R/etc/group"
        OWN_UID=$ACCOUNT OWN_GID=$ACCOUNT   # a dry run into a fresh root: names will do
    fi
}

# --- the steps ------------------------------------------------------------------------------------

step_account() {
    local f before=()
    say "step 1/6: the user and group $ACCOUNT (members of video and render)"
    ensure_dir "$(dirname "$SYSUSERS")" 0755 0 0
    put_file "$REPO/packaging/sysusers.d/edgeroom.conf" "$SYSUSERS" 0644 0 0
    ensure_dir /etc 0755 0 0
    for f in "${ACCOUNT_DB[@]}"; do exists "$R/etc/$f" && before+=("$f"); done
    if account_in_place; then
        say "user $ACCOUNT, group $ACCOUNT and its membership of video and render are in place in $R/etc"
    elif command -v systemd-sysusers >/dev/null 2>&1; then
        if [ -n "$R" ]; then
            act "apply it: systemd-sysusers --root $ROOT $R$SYSUSERS" quiet systemd-sysusers --root "$ROOT" "$R$SYSUSERS"
        else
            act "apply it: systemd-sysusers $SYSUSERS" quiet systemd-sysusers "$SYSUSERS"
        fi
    else
        [ -z "$R" ] || die "systemd-sysusers is missing: with --root it is needed to add the user (install systemd)"
        add_account_by_hand
    fi
    for f in "${ACCOUNT_DB[@]}"; do   # a fresh root: the account database is ours too
        if exists "$R/etc/$f" && ! printf '%s\n' "${before[@]}" | grep -qx -- "$f"; then record "/etc/$f"; fi
    done
    account_ids
}

# The user, its group, and its membership of video and render, as the root's files have them.
account_in_place() {
    grep -q "^$ACCOUNT:" "$R/etc/passwd" 2>/dev/null &&
        awk -F: -v n="$ACCOUNT" '
            $1 == n { own = 1 }
            ($1 == "video" || $1 == "render") && ("," $4 ",") ~ ("," n ",") { member[$1] = 1 }
            END { exit !(own && member["video"] && member["render"]) }' "$R/etc/group" 2>/dev/null
}

add_account_by_hand() {
    local g
    say "systemd-sysusers not found: using groupadd and useradd"
    for g in video render "$ACCOUNT"; do
        getent group "$g" >/dev/null || act "groupadd --system $g" groupadd --system "$g"
    done
    if ! getent passwd "$ACCOUNT" >/dev/null; then
        act "useradd --system $ACCOUNT (home $STATE, shell /usr/sbin/nologin, groups video,render)" \
            useradd --system --gid "$ACCOUNT" --groups video,render --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "edgeroom video appliance" "$ACCOUNT"
    elif ! id -nG "$ACCOUNT" | tr ' ' '\n' | grep -qx render || ! id -nG "$ACCOUNT" | tr ' ' '\n' | grep -qx video; then
        act "usermod -aG video,render $ACCOUNT" usermod -aG video,render "$ACCOUNT"
    fi
}

# The files pip builds edgeroom from, relative to the repository, NUL-separated: what the
# build stamp hashes and what goes into the clean copy pip builds from.
source_files() {
    cd "$REPO"
    find . -maxdepth 1 -type f \( -name pyproject.toml -o -name 'setup.*' -o -name MANIFEST.in -o -name README.md \) -print0
    find framebus services -type f ! -name '*.pyc' ! -name '*.so' ! -path '*/__pycache__/*' -print0
}

# What the venv holds is keyed by the build inputs, the python and the extras.
build_stamp() {
    {
        "$PY" -c 'import sys; print(sys.version)'
        echo "extras=$EXTRAS"
        source_files | LC_ALL=C sort -z | (cd "$REPO" && xargs -0 sha1sum)
    } | sha1sum | cut -c1-16
}

# pip builds in the source tree (build/, *.egg-info), and a build/ left there by an earlier
# build would ship modules since deleted: build from a fresh copy, never writing the checkout.
clean_copy() {
    mkdir -p "$1"
    source_files | tar -C "$REPO" --null -T - -cf - | tar -C "$1" -xf -
}

venv_matches_python() {
    local venv=$1
    [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" = "$("$PY" -c 'import sys; print(sys.version)')" ]
}

# In a scratch root, pip writes the root into the scripts' #! lines; make them find the
# venv's python beside themselves instead, so the root works once it is the real one.
relocate_venv() {
    local venv=$1 inside=$2 f
    for f in "$venv"/bin/*; do
        if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
        if [[ $(head -n1 "$f") == "#!$venv/bin/python"* ]]; then
            { printf '%s\n' '#!/bin/sh' "'''exec' \"\$(dirname -- \"\$(realpath -- \"\$0\")\")\"/'python' \"\$0\" \"\$@\"" "' '''"
              tail -n +2 "$f"; } >"$f.tmp"
            chmod --reference="$f" "$f.tmp"
            mv "$f.tmp" "$f"
        fi
        if grep -qF "$venv" "$f"; then sed -i "s|$venv|$inside|g" "$f"; fi
    done
    if grep -qF "$venv" "$venv/pyvenv.cfg"; then sed -i "s|$venv|$inside|g" "$venv/pyvenv.cfg"; fi
}

step_venv() {
    local venv=$R$PREFIX/venv want spec
    say "step 2/6: the virtual environment $venv with edgeroom${EXTRAS:+[$EXTRAS]}"
    ensure_dir "$PREFIX" 0755 0 0
    record "$PREFIX/venv/"
    if ! venv_matches_python "$venv"; then
        act "create the virtual environment $venv ($PY)" "$PY" -m venv --clear "$venv"
    fi
    spec="$REPO${EXTRAS:+[$EXTRAS]}"
    want=$(build_stamp)
    if [ -x "$venv/bin/edgeroom" ] && [ "$(cat "$venv/.edgeroom-installed" 2>/dev/null)" = "$want" ]; then
        say "$venv already has this edgeroom${EXTRAS:+[$EXTRAS]} (build $want): no pip install"
        return 0
    fi
    act "pip install \"$spec\" into $venv (not editable; built from a clean copy of its package files)" \
        pip_install "$venv" "$TMP/src" "${EXTRAS:+[$EXTRAS]}"
    if [ -n "$R" ]; then
        act "make the venv's scripts name $PREFIX/venv, not $venv" relocate_venv "$venv" "$PREFIX/venv"
    fi
    act "note build $want in $venv/.edgeroom-installed" write_text "$venv/.edgeroom-installed" "$want"
}

pip_install() {
    clean_copy "$2"
    "$1/bin/python" -m pip install -q --disable-pip-version-check "$2$3"
}

write_text() { printf '%s\n' "$2" >"$1"; }

step_config() {
    local want=$TMP/edgeroom.toml
    say "step 3/6: the config $R$CONF and the state directory $R$STATE"
    sed 's|^runtime_dir = ""$|runtime_dir = "/run/edgeroom"|' "$REPO/config/edgeroom.toml" >"$want"
    grep -qx 'runtime_dir = "/run/edgeroom"' "$want" ||
        die "config/edgeroom.toml has no line 'runtime_dir = \"\"' (under [box]) to set to /run/edgeroom"
    ensure_dir /etc/edgeroom 0750 0 "$OWN_GID"
    if ! exists "$R$CONF"; then
        put_file "$want" "$CONF" 0640 0 "$OWN_GID"
    elif cmp -s "$want" "$R$CONF"; then
        record "$CONF"
        say "$R$CONF is up to date"
    else
        record "$CONF"
        say "$R$CONF differs from the shipped config: keeping it; the shipped one goes beside it as edgeroom.toml.new"
        put_file "$want" "$CONF.new" 0640 0 "$OWN_GID"
    fi
    ensure_dir "$STATE" 0750 "$OWN_UID" "$OWN_GID"
}

step_units() {
    local exe=$R$PREFIX/venv/bin/edgeroom out=$TMP/units f name
    say "step 4/6: the units in $R$UNITDIR, for $PREFIX/venv/bin/edgeroom"
    act "check the config: edgeroom config check $R$CONF" clean_env "$exe" config check "$R$CONF" ||
        die "$R$CONF has a problem (above): fix it, then run the installer again"
    act "render the units: edgeroom units render --config $R$CONF --exec $PREFIX/venv/bin/edgeroom" \
        quiet clean_env "$exe" units render --config "$R$CONF" --exec "$PREFIX/venv/bin/edgeroom" --out "$out"
    ensure_dir "$UNITDIR" 0755 0 0
    if [ "$DRY_RUN" = 1 ]; then
        say "write the rendered units (edgeroom.target, edgeroom-*.service) into $R$UNITDIR"
        return 0
    fi
    for f in "$out"/*; do
        put_file "$f" "$UNITDIR/$(basename "$f")" 0644 0 0
    done
    for f in "$R$UNITDIR"/edgeroom.target "$R$UNITDIR"/edgeroom-*.service "$R$UNITDIR"/edgeroom-*.path; do   # units no longer rendered
        name=$(basename "$f")
        if [ -f "$f" ] && [ ! -e "$out/$name" ] && grep -qF "$RENDER_MARK" "$f"; then
            act "remove $f (no longer rendered)" rm -f -- "$f"
        fi
    done
}

systemd_running() { [ -z "$R" ] && [ -d /run/systemd/system ]; }

step_enable() {
    local had_wants=0
    say "step 5/6: enable edgeroom.target"
    if systemd_running; then act "systemctl daemon-reload (systemd rereads the units)" systemctl daemon-reload; fi
    if [ "$ENABLE" = 0 ]; then
        say "not enabling edgeroom.target (--no-enable)"
        return 0
    fi
    [ -d "$R$WANTS" ] && had_wants=1
    if systemd_running; then
        act "systemctl enable --now edgeroom.target (starts the box)" systemctl enable --now edgeroom.target
    elif command -v systemctl >/dev/null 2>&1; then
        act "systemctl --root $ROOT enable edgeroom.target (${R:+installing into a root: }systemd is not running here, so the box starts at the next boot)" \
            systemctl --quiet --root "$ROOT" enable edgeroom.target
    else
        say "systemctl not found: enable edgeroom.target once systemd runs (systemctl enable --now edgeroom.target)"
    fi
    if [ "$had_wants" = 0 ] && [ -d "$R$WANTS" ]; then record "$WANTS/"; fi
    if exists "$R$WANTS/edgeroom.target"; then record "$WANTS/edgeroom.target"; fi
}

# Entries of an earlier manifest (in PREFIX, or the one an uninstall left in /etc/edgeroom).
old_manifest() {
    local m
    for m in "$R$PREFIX/install-manifest.txt" "$R/etc/edgeroom/install-manifest.txt"; do
        [ -f "$m" ] && grep -v '^#' "$m"
    done
    true
}

manifest_text() {
    local p old=$1
    echo "# edgeroom: what scripts/install.sh laid down outside the venv ($PREFIX/venv/ is one entry)."
    echo "# Paths inside the root; directories end in /. \`install.sh --uninstall\` removes the install"
    echo "# and keeps /etc/edgeroom and $STATE; --purge removes those and the user too."
    {
        echo "$PREFIX/install-manifest.txt"
        { printf '%s\n' "${MANIFEST[@]}"; printf '%s\n' "$old"; } | while IFS= read -r p; do
            if [ -n "$p" ] && exists "$R${p%/}"; then echo "$p"; fi
        done
    } | LC_ALL=C sort -u
}

step_manifest() {
    local file=$PREFIX/install-manifest.txt kept=/etc/edgeroom/install-manifest.txt old
    say "step 6/6: the manifest $R$file"
    if [ "$DRY_RUN" = 1 ]; then
        say "write $R$file (every file and directory above)"
        return 0
    fi
    old=$(old_manifest | grep -vxF "$kept" || true)
    if [ -f "$R$kept" ]; then
        act "remove $R$kept (left by an uninstall; its entries move into $R$file)" rm -f -- "$R$kept"
    fi
    manifest_text "$old" >"$TMP/manifest"
    put_file "$TMP/manifest" "$file" 0644 0 0
}

next_steps() {
    cat <<EOF
install: done. Next:
  1. edit the config:      ${R}$CONF   (then: $PREFIX/venv/bin/edgeroom config check $CONF)
  2. start the box:        systemctl start edgeroom.target   (after editing: systemctl restart edgeroom.target)
  3. follow its logs:      journalctl -u 'edgeroom-*' -f
  4. ask it:               $PREFIX/venv/bin/edgeroom ctl status   (as root or a user in group $ACCOUNT:
                           usermod -aG $ACCOUNT YOU, then log in again)
  5. scrape its metrics:   http://127.0.0.1:9750/metrics
EOF
}

install_box() {
    local enabling=""
    check_distro
    detect_platform
    pick_extras
    pick_python
    if [ -n "$R" ]; then say "root: $ROOT (a scratch root: paths below are inside it; systemd is not started)"; fi
    if systemd_running; then enabling="enable and start edgeroom.target"
    elif [ "$ENABLE" = 1 ]; then enabling="enable edgeroom.target offline (starts at the next boot)"
    fi
    [ "$ENABLE" = 1 ] || enabling="leave edgeroom.target disabled (--no-enable)"
    say "plan: user $ACCOUNT; venv $R$PREFIX/venv with edgeroom${EXTRAS:+[$EXTRAS]}; config $R$CONF (kept if present);"
    say "plan: $R$STATE; units in $R$UNITDIR; $enabling; manifest $R$PREFIX/install-manifest.txt"
    if [ -n "$R" ] && [ ! -d "$ROOT" ]; then act "create the root $ROOT" mkdir -p -- "$ROOT"; fi
    ensure_python_tools
    step_account
    step_venv
    step_config
    step_units
    step_enable
    step_manifest
    next_steps
}

# --- uninstall ------------------------------------------------------------------------------------

remove() {
    local path=$1
    if exists "$path"; then act "remove $path" rm -rf -- "$path"; fi
}

uninstall_box() {
    local entries f d kept_manifest=$R/etc/edgeroom/install-manifest.txt
    say "uninstall from ${R:-this system} (prefix $PREFIX)$( [ "$PURGE" = 1 ] && echo ': purge: config, state and user too')"
    entries=$(old_manifest | LC_ALL=C sort -u)
    # the target and its enablement
    if systemd_running && [ -f "$UNITDIR/edgeroom.target" ]; then
        act "systemctl disable --now edgeroom.target (stops the box)" systemctl disable --now edgeroom.target
        act "systemctl stop 'edgeroom-*' (any instance started by hand)" try systemctl stop 'edgeroom-*'
    elif [ -f "$R$UNITDIR/edgeroom.target" ] && command -v systemctl >/dev/null 2>&1; then
        act "systemctl --root $ROOT disable edgeroom.target" systemctl --quiet --root "$ROOT" disable edgeroom.target
    fi
    for f in "$R$UNITDIR"/*.wants/edgeroom* "$R$UNITDIR"/*.requires/edgeroom* "$R$UNITDIR"/edgeroom*.wants/*; do
        if [ -L "$f" ]; then act "remove $f (enablement)" rm -f -- "$f"; fi
    done
    for d in "$R$UNITDIR"/edgeroom*.wants "$R$UNITDIR"/edgeroom*.requires; do
        if [ -d "$d" ] && [ -z "$(ls -A -- "$d")" ]; then act "remove $d (empty)" rmdir -- "$d"; fi
    done
    # the units we rendered; drop-ins (edgeroom*.d) are the admin's: purge only
    for f in "$R$UNITDIR"/edgeroom.target "$R$UNITDIR"/edgeroom-*.service "$R$UNITDIR"/edgeroom-*.path; do
        if [ -f "$f" ]; then
            if grep -qF "$RENDER_MARK" "$f"; then act "remove $f" rm -f -- "$f"
            else say "keeping $f: not rendered by edgeroom"; fi
        fi
    done
    if [ "$PURGE" = 1 ]; then
        for d in "$R$UNITDIR"/edgeroom*.d; do remove "$d"; done
    fi
    if systemd_running; then act "systemctl daemon-reload" systemctl daemon-reload; fi
    remove "$R$SYSUSERS"
    if [ -f "$R$PREFIX/install-manifest.txt" ] || [ -f "$R$PREFIX/venv/pyvenv.cfg" ]; then
        remove "$R$PREFIX"
    elif exists "$R$PREFIX"; then
        say "keeping $R$PREFIX: no install-manifest.txt or venv in it, so not an edgeroom install"
    fi
    if [ "$PURGE" = 1 ]; then
        remove "$R/etc/edgeroom"
        remove "$R$STATE"
        [ -n "$R" ] || remove /run/edgeroom
        remove_account
    fi
    # directories the install created, deepest first, where nothing is left in them
    while IFS= read -r d; do
        case "$d" in */) ;; *) continue ;; esac
        d=${d%/}
        if [ "$PURGE" = 0 ] && { [ "$d" = /etc/edgeroom ] || [ "$d" = "$STATE" ]; }; then continue; fi
        if [ -d "$R$d" ] && [ -z "$(ls -A -- "$R$d")" ]; then act "remove $R$d (empty)" rmdir -- "$R$d"; fi
    done < <(printf '%s\n' "$entries" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
    if [ "$PURGE" = 0 ] && [ -d "$R/etc/edgeroom" ] && [ -n "$entries" ]; then
        act "write $kept_manifest (what remains of the install, for a later --purge)" keep_manifest "$entries"
    fi
    if [ "$PURGE" = 0 ]; then
        say "kept $R/etc/edgeroom and $R$STATE and the user $ACCOUNT (--uninstall --purge removes them)"
    fi
    say "uninstalled"
}

keep_manifest() {
    local p kept=/etc/edgeroom/install-manifest.txt
    {
        echo "# edgeroom: what remains of an install after \`install.sh --uninstall\` (--purge removes it)."
        { printf '%s\n' "$1" | grep -vxF "$PREFIX/install-manifest.txt"; echo "$kept"; } | LC_ALL=C sort -u |
            while IFS= read -r p; do
                if [ "$p" = "$kept" ] || exists "$R${p%/}"; then echo "$p"; fi
            done
    } >"$TMP/kept"
    install -m 0644 "$TMP/kept" "$R$kept"
}

remove_account() {
    local prefix=()
    [ -z "$R" ] || prefix=(--prefix "$ROOT")
    if grep -q "^$ACCOUNT:" "$R/etc/passwd" 2>/dev/null; then
        act "userdel ${prefix[*]} $ACCOUNT" userdel "${prefix[@]}" "$ACCOUNT"
    fi
    if grep -q "^$ACCOUNT:" "$R/etc/group" 2>/dev/null; then
        act "groupdel ${prefix[*]} $ACCOUNT" groupdel "${prefix[@]}" "$ACCOUNT"
    fi
}

main() {
    parse_args "$@"
    if [ "$DRY_RUN" = 1 ]; then say "dry run: every action is printed, nothing is changed"; fi
    if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo $0 $*)"; fi
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgeroom-install.XXXXXX")
    trap 'rm -rf -- "$TMP"' EXIT
    if [ "$UNINSTALL" = 1 ]; then uninstall_box; else install_box; fi
    if [ "$DRY_RUN" = 1 ]; then say "dry run over: nothing was changed"; fi
}

main "$@"
