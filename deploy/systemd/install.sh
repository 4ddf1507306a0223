#!/bin/sh
# Install or upgrade the EdgeFleet device agent on a bare Linux device (systemd, Python >= 3.11).
# Run as root from an unpacked EdgeFleet release (or a checkout); see docs/install-device.md.
#
#   sudo deploy/systemd/install.sh --wheel dist/edgefleet-0.1.0-py3-none-any.whl \
#       --ca ca.pem --tuf-root root.json --token-file token.txt
#
# What it does: a venv at /opt/edgefleet with exactly agent/requirements.txt (binary wheels, no
# dependency resolution) plus the edgefleet wheel without its operator-side dependencies; the fleet
# CA and TUF root in /etc/edgefleet; the token in a root-only file; the settings template if there
# are no settings yet; the systemd unit, enabled and started. Each install is a release folder under
# /opt/edgefleet/releases; /opt/edgefleet/current points at the running one, /opt/edgefleet/previous
# at the one before (roll back: `ln -sfn "$(readlink /opt/edgefleet/previous)" /opt/edgefleet/current`,
# then restart the unit).
set -eu

# Overridable only to try the script out in a scratch folder; the unit expects these paths.
PREFIX=${EDGEFLEET_PREFIX:-/opt/edgefleet}
CONF=${EDGEFLEET_CONF:-/etc/edgefleet}
UNIT=${EDGEFLEET_UNIT:-/etc/systemd/system/edgefleet-agent.service}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

wheel="" ca="" tuf_root="" token_file="" start=yes
python=${PYTHON:-python3}
requirements="$REPO/agent/requirements.txt"

usage() {
    echo "usage: $0 --wheel EDGEFLEET.whl [--ca ca.pem] [--tuf-root root.json] [--token-file FILE]" >&2
    echo "          [--requirements agent/requirements.txt] [--python python3.11] [--no-start]" >&2
    exit 2
}
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) wheel=${2:-}; shift 2 ;;
        --ca) ca=${2:-}; shift 2 ;;
        --tuf-root) tuf_root=${2:-}; shift 2 ;;
        --token-file) token_file=${2:-}; shift 2 ;;
        --requirements) requirements=${2:-}; shift 2 ;;
        --python) python=${2:-}; shift 2 ;;
        --no-start) start=no; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
done

[ "$(id -u)" -eq 0 ] || [ -n "${EDGEFLEET_PREFIX:-}" ] || die "run as root (it writes $PREFIX, $CONF and $UNIT)"
[ -n "$wheel" ] || usage
[ -f "$wheel" ] || die "no wheel at $wheel"
[ -f "$requirements" ] || die "no requirements list at $requirements"
for f in "$ca" "$tuf_root" "$token_file"; do
    [ -z "$f" ] || [ -f "$f" ] || die "no file at $f"
done
"$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is not Python >= 3.11 with the venv module (Debian/Raspberry Pi OS: apt install python3-venv)"
if [ ! -f "$CONF/ca.pem" ] && [ -z "$ca" ]; then die "first install: give --ca (the gateway's ca.pem)"; fi
if [ ! -f "$CONF/root.json" ] && [ -z "$tuf_root" ]; then die "first install: give --tuf-root (root.json)"; fi

# 1. The Python environment, in a release folder of its own: built at its final path (a venv cannot
#    move), switched to by one symlink, the previous release kept for a rollback.
version=$(basename "$wheel" | cut -d- -f2)
release="$PREFIX/releases/$version-$(date +%Y%m%d%H%M%S)"
install -d -m 0755 "$PREFIX/releases"
"$python" -m venv "$release"
"$release/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
    --no-deps --only-binary=:all: -r "$requirements"
"$release/bin/pip" check
"$release/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check --no-deps "$wheel"
"$release/bin/edgefleet" agent run --help >/dev/null

# 2. Configuration: public trust anchors 0644, the token root-only.
install -d -m 0755 "$CONF"
[ -z "$ca" ] || install -m 0644 "$ca" "$CONF/ca.pem"
[ -z "$tuf_root" ] || install -m 0644 "$tuf_root" "$CONF/root.json"
if [ -n "$token_file" ]; then
    (umask 077 && printf 'EDGEFLEET_AGENT_TOKEN=%s\n' "$(head -n 1 "$token_file" | tr -d '\r\n')" \
        > "$CONF/agent-token.env")
fi
if [ ! -f "$CONF/agent.env" ]; then
    install -m 0644 "$HERE/agent.env" "$CONF/agent.env"
    echo "install.sh: wrote the settings template $CONF/agent.env: set EDGEFLEET_NAME and the gateway there" >&2
    start=no
fi

# 3. Switch releases (keep the current one as previous; drop older ones), install the unit, (re)start.
previous=$(readlink "$PREFIX/current" 2>/dev/null || true)
for old in "$PREFIX"/releases/*; do
    [ "$old" = "$release" ] || [ "$old" = "$previous" ] || rm -rf "$old"
done
ln -sfn "$release" "$PREFIX/current.new" && mv -T "$PREFIX/current.new" "$PREFIX/current"
[ -z "$previous" ] || ln -sfn "$previous" "$PREFIX/previous"
install -m 0644 "$HERE/edgefleet-agent.service" "$UNIT"
$SYSTEMCTL daemon-reload
$SYSTEMCTL enable edgefleet-agent >/dev/null
# time-sync.target waits for a real clock sync only with this service on: a board without a
# battery-backed clock would otherwise start with a wrong time and refuse every certificate.
$SYSTEMCTL enable systemd-time-wait-sync.service >/dev/null 2>&1 || true
if [ "$start" = yes ]; then
    $SYSTEMCTL restart edgefleet-agent
    echo "install.sh: started; follow it with: journalctl -u edgefleet-agent -f" >&2
else
    echo "install.sh: installed, not started: edit $CONF/agent.env, then: systemctl start edgefleet-agent" >&2
fi
