#!/usr/bin/env bash
# Installs what azfs needs on a Debian node and creates the project's virtual
# environment. Idempotent: a second run only checks.
#   setup-env.sh               runtime packages + venv
#   setup-env.sh --quickstart  also what `azfs up`/`azfs demo` need (Azurite, busybox)
#   setup-env.sh --test        also test/bench packages, Azurite and test extras
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AZFS_VENV:-$ROOT/.venv}"
WITH_TEST=0
WITH_AZURITE=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1; WITH_AZURITE=1 ;;
        --quickstart) WITH_AZURITE=1 ;;
        *) echo "setup-env.sh: unknown option $arg (use --quickstart or --test)" >&2; exit 2 ;;
    esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
    echo "setup-env.sh: must run as root (it installs Debian packages and mounts filesystems)" >&2
    exit 1
fi

wanted_packages() {
    grep -hv '^\s*#' "$@" | sed '/^\s*$/d'
}

lists=("$ROOT/packaging/debian-packages.txt")
[[ $WITH_AZURITE == 1 ]] && lists+=("$ROOT/packaging/debian-packages-quickstart.txt")
[[ $WITH_TEST == 1 ]] && lists+=("$ROOT/packaging/debian-packages-test.txt")
missing=()
for pkg in $(wanted_packages "${lists[@]}"); do
    # node/npm may come from elsewhere than Debian; accept them when on PATH.
    if [[ $pkg == nodejs ]] && command -v node >/dev/null; then continue; fi
    if [[ $pkg == npm ]] && command -v npm >/dev/null; then continue; fi
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts etcd and postgresql as services on install; azfs and its tests
# run their own instances, so the packaged ones are not needed.
for svc in etcd postgresql; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

PYTHON="${AZFS_PYTHON:-$(command -v python3)}"
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.azfs-installed"
# this environment runs a whole node, manager included (`azfs up`), so it always
# gets the manager's extra; a compute node installed by install-node.sh does not
extras="[manager]"
[[ $WITH_TEST == 1 ]] && extras="[manager,test]"
hash="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
want="$hash$extras"
have="$(cat "$stamp" 2>/dev/null || true)"
# an install with the test extras also serves a runtime-only request
if [[ "$have" != "$want" && "$have" != "$hash[manager,test]" ]]; then
    log "installing azfs$extras into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT$extras"
    echo "$want" > "$stamp"
fi

if [[ $WITH_AZURITE == 1 ]]; then
    NODE_PREFIX="$ROOT/.cache/node"
    if [[ ! -x "$NODE_PREFIX/node_modules/.bin/azurite-blob" ]]; then
        log "installing Azurite (npm) into $NODE_PREFIX"
        mkdir -p "$NODE_PREFIX"
        npm install --silent --no-audit --no-fund --prefix "$NODE_PREFIX" azurite@3 >/dev/null
    fi
fi
log "environment ready: $VENV"
