#!/usr/bin/env bash
# One node in one command: installs what is missing, brings a whole azfs node
# up on this machine (managerd on SQLite, agentd with its FUSE mount, a local
# directory standing in for an Azure Files share, Azurite standing in for Blob
# Storage with a sample dataset), then shows it doing its job with two runc
# kernels.  The node keeps running afterwards; stop it with `azfs down`.
# Safe to run again.  Arguments go to `azfs up` (e.g. --etcd local, --manager-port N).
# The state directory is $AZFS_NODE_DIR (default /var/lib/azfs/node).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

say "== installing what is missing (Debian packages, .venv, Azurite)"
"$ROOT/packaging/setup-env.sh" --quickstart
export PATH="$ROOT/.venv/bin:$ROOT/.cache/node/node_modules/.bin:$PATH"
STATE="${AZFS_NODE_DIR:-/var/lib/azfs/node}"

say "== azfs up --state-dir $STATE $*"
azfs up --state-dir "$STATE" --quiet "$@"

say "== azfs demo --state-dir $STATE"
azfs demo --state-dir "$STATE"

cat <<MSG

azfs is installed in $ROOT/.venv: put it on your PATH with
  export PATH="$ROOT/.venv/bin:\$PATH"
MSG
