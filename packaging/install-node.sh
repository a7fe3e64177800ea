#!/usr/bin/env bash
# Installs azfs on a cluster node (Debian), idempotently:
#   * the Debian packages of packaging/debian-packages.txt that are missing,
#   * a virtual environment $PREFIX/venv with azfs (from this checkout or a wheel),
#   * the systemd units azfs-agentd and azfs-managerd (not enabled or started),
#   * /etc/azfs/{agent.toml,manager.toml,volumes.yaml,managerd.env} from
#     packaging/examples, only where absent (an existing config is never touched),
#   * root-only (0700) state, cache and key directories: /var/lib/azfs{,/agent,/managerd},
#     /var/cache/azfs, /etc/azfs/{tls,cifs} (a looser mode is fixed, another owner refused),
#   * the docs under $PREFIX/share/doc.
# Usage: install-node.sh [--dry-run] [--prefix /opt/azfs] [--wheel FILE.whl]
#   --dry-run   print what would be done, change nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/azfs
ETC=/etc/azfs
UNIT_DIR=/etc/systemd/system
DRY=0
WHEEL=""
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift ;;
        --wheel) WHEEL="${2:?--wheel needs a file}"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install-node.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n $WHEEL && ! -f $WHEEL ]] && { echo "install-node.sh: no such wheel: $WHEEL" >&2; exit 2; }
if [[ $DRY == 0 && $EUID -ne 0 ]]; then
    echo "install-node.sh: must run as root (or use --dry-run)" >&2
    exit 1
fi

log() { printf '[install] %s\n' "$*"; }
# run CMD...: does it, or with --dry-run only says it
run() {
    if [[ $DRY == 1 ]]; then printf '[dry-run] %s\n' "$*"; else "$@"; fi
}
# install_file SRC DEST MODE: copies when DEST differs (units, docs)
install_file() {
    if [[ -f $2 ]] && cmp -s "$1" "$2"; then return 1; fi
    log "installing $2"
    run install -D -m "$3" "$1" "$2"
}
# private_dir DIR: DIR exists, owned by root, mode 0700 -- only root reaches what is below
private_dir() {
    if [[ ! -e $1 ]]; then
        log "creating $1 (0700)"
        run install -d -m 0700 -o root -g root "$1"
        return
    fi
    local owner mode
    owner="$(stat -L -c %u "$1")"
    mode="$(stat -L -c %a "$1")"
    if [[ $owner != 0 ]]; then
        echo "install-node.sh: $1 is owned by uid $owner, not root; azfs mounts every" \
             "user's vfolders below it: 'chown root: $1' first" >&2
        exit 1
    fi
    if [[ $mode != 700 ]]; then
        log "$1 had mode $mode; changing it to 0700"
        run chmod 0700 "$1"
    fi
}
# install_config SRC DEST MODE: copies only when DEST does not exist (operator's configs)
install_config() {
    if [[ -e $2 ]]; then log "keeping existing $2"; return; fi
    log "installing example config $2 (edit it)"
    run install -D -m "$3" "$1" "$2"
}

# 1. Debian packages
missing=()
for pkg in $(grep -hv '^\s*#' "$ROOT/packaging/debian-packages.txt" | sed '/^\s*$/d'); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    log "installing Debian packages: ${missing[*]}"
    run env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
else
    log "Debian packages: all present"
fi
# a node runs no etcd of its own; the package is there for `azfs up --etcd local`
if systemctl is-enabled etcd >/dev/null 2>&1; then
    run systemctl disable --now etcd
fi

# 2. the virtual environment
VENV="$PREFIX/venv"
SOURCE="${WHEEL:-$ROOT}"
# what is installed, by content: the wheel, or the checkout's package sources
if [[ -n $WHEEL ]]; then
    want="$(sha256sum "$WHEEL" | cut -c1-16)"
else
    want="$(cd "$ROOT" && find pyproject.toml azfs agentd managerd -type f ! -name '*.pyc' \
            -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
fi
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    run python3 -m venv "$VENV"
fi
if [[ "$(cat "$VENV/.azfs-source" 2>/dev/null || true)" != "$want" ]]; then
    log "installing azfs from $SOURCE into $VENV"
    run "$VENV/bin/pip" install -q --upgrade pip
    run "$VENV/bin/pip" install -q --upgrade "$SOURCE${AZFS_EXTRAS:+[$AZFS_EXTRAS]}"
    if [[ $DRY == 1 ]]; then printf '[dry-run] record %s in %s\n' "$want" "$VENV/.azfs-source"
    else echo "$want" > "$VENV/.azfs-source"; fi
else
    log "azfs in $VENV is up to date"
fi
for cmd in azfs azfs-agentd azfs-managerd; do
    link="/usr/local/bin/$cmd"
    if [[ "$(readlink "$link" 2>/dev/null || true)" != "$VENV/bin/$cmd" ]]; then
        run ln -sfn "$VENV/bin/$cmd" "$link"
    fi
done

# 3. systemd units (ExecStart points into $VENV)
reload=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for unit in azfs-agentd.service azfs-managerd.service; do
    sed "s|/opt/azfs/|$PREFIX/|g" "$ROOT/packaging/systemd/$unit" > "$tmp/$unit"
    install_file "$tmp/$unit" "$UNIT_DIR/$unit" 0644 && reload=1
done
if [[ $reload == 1 ]]; then run systemctl daemon-reload; fi

# 4. configs, only where absent; root-only directories for what must stay private
run install -d -m 0755 "$ETC"
# vfolders live below the agent's and the manager's volume mounts and FUSE views,
# dataset blocks in the cache, keys in tls/ and cifs/: no other user may enter them
for dir in /var/lib/azfs /var/lib/azfs/agent /var/lib/azfs/managerd /var/cache/azfs \
           "$ETC/tls" "$ETC/cifs"; do
    private_dir "$dir"
done
install_config "$ROOT/packaging/examples/agent.toml" "$ETC/agent.toml" 0644
install_config "$ROOT/packaging/examples/manager.toml" "$ETC/manager.toml" 0644
install_config "$ROOT/packaging/examples/volumes.yaml" "$ETC/volumes.yaml" 0644
install_config "$ROOT/packaging/examples/managerd.env" "$ETC/managerd.env" 0600
for doc in README.md docs/OPERATIONS.md docs/SEMANTICS.md docs/PERFORMANCE.md; do
    install_file "$ROOT/$doc" "$PREFIX/share/doc/$(basename "$doc")" 0644 || true
done

log "done.  Next: edit $ETC/*, then on a compute node: systemctl enable --now azfs-agentd;"
log "on the manager host: azfs-managerd --config $ETC/manager.toml create-user admin --admin"
log "(prints the first admin token once), then systemctl enable --now azfs-managerd"
