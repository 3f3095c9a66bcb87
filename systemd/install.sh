#!/usr/bin/env bash
# Install (or update, or remove) edge-agent as a systemd service on a Raspberry Pi, a Jetson or a Linux PC.
# Run as root from a checkout of the project; running it again updates the install and keeps config and state.
# See systemd/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [--prefix DIR] [--no-start] [--dry-run] [--uninstall [--purge]]
                  [--board pi|jetson|generic] [--extras LIST] [--system-site-packages]
                  [--show-dropin]

  --prefix DIR            install into DIR instead of / (staging trees, images, tests); user and unit are
                          set up with useradd --root / systemctl --root, nothing is started
  --no-start              enable the service but do not start or restart it
  --dry-run               print what would be done, change nothing (no root needed)
  --uninstall             stop and disable the service, remove the unit and /opt/edge-agent;
                          keeps /etc/edge-agent, /var/lib/edge-agent and the user
  --purge                 with --uninstall: also remove config, state (models, outbox) and the user
  --board FAMILY          skip detection: pi, jetson or generic
  --extras LIST           pip extras to install (default by board: pi/generic litert,onnx,serial,mqtt,update;
                          jetson onnx,serial,mqtt,update); update brings the signed-update and device-command
                          crypto that an agent.toml from `fleet device provision` needs
  --system-site-packages  let the venv see the OS's Python packages (JetPack's TensorRT bindings, apt OpenCV)
  --show-dropin           print the board's systemd drop-in (empty for boards without one) and exit

environment: PYTHON  interpreter for the venv (default python3; must be >= 3.10)
EOF
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/
START=1
DRY_RUN=0
UNINSTALL=0
PURGE=0
BOARD=""
EXTRAS=""
SITE_PACKAGES=0
SHOW_DROPIN=0
PYTHON=${PYTHON:-python3}
SERVICE=edge-agent
USER_NAME=edge-agent
DROPIN_MARK="# managed by edge-agent install.sh"

ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        --board) BOARD=${2:?--board needs pi, jetson or generic}; shift 2 ;;
        --board=*) BOARD=${1#*=}; shift ;;
        --extras) EXTRAS=${2:?--extras needs a list}; shift 2 ;;
        --extras=*) EXTRAS=${1#*=}; shift ;;
        --system-site-packages) SITE_PACKAGES=1; shift ;;
        --show-dropin) SHOW_DROPIN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$BOARD" in
    "" | pi | jetson | generic) ;;
    *) echo "install.sh: --board must be pi, jetson or generic, not '$BOARD'" >&2; exit 2 ;;
esac
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
    echo "install.sh: --purge only goes with --uninstall" >&2
    exit 2
fi

case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
PREFIX=${PREFIX%/}
OPT=$PREFIX/opt/edge-agent
VENV=$OPT/venv
ETC=$PREFIX/etc/edge-agent
CONFIG=$ETC/agent.toml
STATE=$PREFIX/var/lib/edge-agent
UNIT_DIR=$PREFIX/etc/systemd/system
UNIT=$UNIT_DIR/$SERVICE.service
DROPIN=$UNIT_DIR/$SERVICE.service.d/10-board.conf
SYSTEMCTL=(systemctl)
[ -n "$PREFIX" ] && SYSTEMCTL=(systemctl "--root=$PREFIX")

say() { printf '==> %s\n' "$*"; }

# Run a command, or print it under --dry-run.
run() {
    local arg shown=""
    for arg in "$@"; do
        if [[ "$arg" =~ ^[][A-Za-z0-9_./:=@%+,-]+$ ]]; then shown+=" $arg"; else shown+=" '${arg//\'/\'\\\'\'}'"; fi
    done
    if [ "$DRY_RUN" = 1 ]; then
        printf '[dry-run]%s\n' "$shown"
    else
        printf '+%s\n' "$shown"
        "$@"
    fi
}

# write_file PATH MODE [GROUP] < content: replace PATH atomically (printed instead under --dry-run).
write_file() {
    local path=$1 mode=$2 group=${3:-} content
    content=$(cat)
    if [ "$DRY_RUN" = 1 ]; then
        printf '[dry-run] write %s (mode %s%s):\n' "$path" "$mode" "${group:+, group $group}"
        printf '%s\n' "$content" | sed 's/^/    | /'
        return
    fi
    printf '+ write %s\n' "$path"
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp"
    chmod "$mode" "$path.tmp"
    if [ -n "$group" ]; then chgrp "$group" "$path.tmp"; fi
    mv -f "$path.tmp" "$path"
}

has_group() {
    if [ -z "$PREFIX" ]; then getent group "$1" >/dev/null; else grep -q "^$1:" "$PREFIX/etc/group" 2>/dev/null; fi
}

# A group as chgrp takes it: the name on the live system, the gid from the staging tree's /etc/group.
group_ref() {
    if [ -z "$PREFIX" ]; then
        if has_group "$1"; then echo "$1"; fi
    else
        awk -F: -v g="$1" '$1 == g { print $3 }' "$PREFIX/etc/group" 2>/dev/null || true
    fi
}

has_user() {
    if [ -z "$PREFIX" ]; then getent passwd "$1" >/dev/null; else grep -q "^$1:" "$PREFIX/etc/passwd" 2>/dev/null; fi
}

detect_board() {
    local model=""
    [ -r /proc/device-tree/model ] && model=$(tr -d '\0' </proc/device-tree/model)
    if [ -e /etc/nv_tegra_release ] || [[ "$model" == *Jetson* ]]; then
        echo jetson
    elif [[ "$model" == *"Raspberry Pi"* ]]; then
        echo pi
    else
        echo generic
    fi
}

# Board-specific drop-in: the Jetson needs its GPU device nodes and the nvargus-daemon socket in /tmp.
board_dropin() {
    [ "$1" = jetson ] || return 0
    cat <<EOF
$DROPIN_MARK; local changes belong in another drop-in (systemctl edit $SERVICE).
[Service]
# CUDA / TensorRT open the Tegra GPU nodes (/dev/nvhost-*, /dev/nvmap, /dev/nvgpu/*), whose /proc/devices names
# differ between L4T releases: lift the device ACL and rely on their permissions (group video) instead.
DeviceAllow=
DevicePolicy=auto
# nvarguscamerasrc (CSI cameras) talks to nvargus-daemon through the socket /tmp/argus_socket.
PrivateTmp=no
EOF
}

[ -n "$BOARD" ] || BOARD=$(detect_board)
if [ "$SHOW_DROPIN" = 1 ]; then
    board_dropin "$BOARD"
    exit 0
fi

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo $0 ${ARGS[*]:-}), or use --dry-run to see the plan" >&2
    exit 1
fi

# ---- uninstall ------------------------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    say "stopping and disabling $SERVICE"
    if [ -z "$PREFIX" ]; then
        run systemctl disable --now "$SERVICE" || true
    else
        run "${SYSTEMCTL[@]}" disable "$SERVICE" || true
    fi
    say "removing the unit and $OPT"
    run rm -f "$UNIT"
    if [ -f "$DROPIN" ] && grep -q "$DROPIN_MARK" "$DROPIN"; then run rm -f "$DROPIN"; fi
    if [ -d "$(dirname "$DROPIN")" ]; then run rmdir --ignore-fail-on-non-empty "$(dirname "$DROPIN")"; fi
    run rm -rf "$OPT"
    if [ -z "$PREFIX" ]; then run systemctl daemon-reload; fi
    if [ "$PURGE" = 1 ]; then
        say "purging config, state and the $USER_NAME user"
        run rm -rf "$ETC" "$STATE"
        if has_user "$USER_NAME"; then
            if [ -z "$PREFIX" ]; then run userdel "$USER_NAME"; else run userdel --root "$PREFIX" "$USER_NAME"; fi
        fi
        if [ "$DRY_RUN" = 0 ] && has_group "$USER_NAME"; then
            if [ -z "$PREFIX" ]; then run groupdel "$USER_NAME"; else run groupdel --root "$PREFIX" "$USER_NAME"; fi
        fi
    else
        say "kept $ETC, $STATE and the $USER_NAME user (--uninstall --purge removes them)"
    fi
    exit 0
fi

# ---- install --------------------------------------------------------------------------------------------
if [ -z "$EXTRAS" ]; then
    case "$BOARD" in
        jetson) EXTRAS=onnx,serial,mqtt,update ;;
        *) EXTRAS=litert,onnx,serial,mqtt,update ;;
    esac
fi
say "board: $BOARD; extras: $EXTRAS; source: $SRC; prefix: ${PREFIX:-/}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    found=$("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "not found")
    echo "install.sh: edge-agent needs Python >= 3.10, $PYTHON is $found" \
        "(fix: on JetPack 4 install a newer Python and run PYTHON=/path/to/python3.10 $0)" >&2
    [ "$DRY_RUN" = 1 ] || exit 1
fi

say "system user $USER_NAME (no login; groups video, dialout)"
groups=()
for g in video dialout; do has_group "$g" && groups+=("$g"); done
group_list=$(IFS=,; echo "${groups[*]:-}")
user_cmd=(useradd)
mod_cmd=(usermod)
[ -n "$PREFIX" ] && user_cmd+=(--root "$PREFIX") && mod_cmd+=(--root "$PREFIX")
if [ -n "$PREFIX" ] && [ ! -f "$PREFIX/etc/passwd" ]; then
    echo "    skipped: $PREFIX/etc/passwd does not exist"
elif has_user "$USER_NAME"; then
    if [ -n "$group_list" ]; then run "${mod_cmd[@]}" --append --groups "$group_list" "$USER_NAME"; fi
else
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    run "${user_cmd[@]}" --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
        --shell "$nologin" --comment "edge-agent inference daemon" ${group_list:+--groups "$group_list"} "$USER_NAME"
fi

say "virtual environment $VENV"
if [ -x "$VENV/bin/python" ]; then
    echo "    exists: updating the packages in it"
else
    venv_args=()
    [ "$SITE_PACKAGES" = 1 ] && venv_args+=(--system-site-packages)
    run "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
fi
run "$VENV/bin/python" -m pip install --upgrade "${SRC}[${EXTRAS}]"

say "firmware profiles: reference copy in $OPT/firmware-profiles, local overrides in $ETC/firmware-profiles"
run mkdir -p "$OPT/firmware-profiles" "$ETC/firmware-profiles"
run cp -f "$SRC"/firmware-profiles/*.toml "$OPT/firmware-profiles/"
run install -m 0644 "$SRC/systemd/README.md" "$OPT/README.md"

say "config $CONFIG"
NEW_CONFIG=0
if [ -e "$CONFIG" ]; then
    echo "    exists: kept as it is"
else
    NEW_CONFIG=1
    config_group=$(group_ref "$USER_NAME")
    if [ "$DRY_RUN" = 1 ]; then config_group=$USER_NAME; fi
    write_file "$CONFIG" 0640 "$config_group" <<EOF
# edge-agent configuration (docs/config.md). Reload after editing: systemctl reload edge-agent
device_id = "$(uname -n)"

# Firmware profile: "auto" detects the board; or one of the ids in /opt/edge-agent/firmware-profiles.
# profile = "auto"

# Add at least one source and one pipeline, for example:
# [sources.cam]
# type = "camera"
# device = 0
#
# [pipelines.main]
# source = "cam"
# model = "/var/lib/edge-agent/models/my-model"
EOF
fi

say "systemd unit $UNIT"
run mkdir -p "$UNIT_DIR"
run install -m 0644 "$SRC/systemd/edge-agent.service" "$UNIT"
dropin_text=$(board_dropin "$BOARD")
if [ -n "$dropin_text" ]; then
    write_file "$DROPIN" 0644 <<<"$dropin_text"
elif [ -f "$DROPIN" ] && grep -q "$DROPIN_MARK" "$DROPIN"; then
    run rm -f "$DROPIN"
fi

if [ -n "$PREFIX" ]; then
    run "${SYSTEMCTL[@]}" enable "$SERVICE"
    say "installed into $PREFIX; nothing started (a venv is not relocatable: build it where it will run)"
    exit 0
fi
was_active=0
systemctl is-active --quiet "$SERVICE" 2>/dev/null && was_active=1
run systemctl daemon-reload
if [ "$START" = 0 ]; then
    run systemctl enable "$SERVICE"
    say "enabled; start it with: systemctl start $SERVICE"
elif [ "$NEW_CONFIG" = 1 ]; then
    run systemctl enable "$SERVICE"
    say "enabled but not started: add a pipeline to $CONFIG, then: systemctl start $SERVICE"
else
    run systemctl enable --now "$SERVICE"
    if [ "$was_active" = 1 ]; then run systemctl restart "$SERVICE"; fi
    say "running; follow it with: journalctl -u $SERVICE -f"
fi
