#!/usr/bin/env bash
# Brings azfs up on this node with embedded defaults and shows it working.
# Safe to run twice. Stop everything with: .venv/bin/azfs umount /mnt/azfs-demo
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/packaging/setup-env.sh"
AZFS="$ROOT/.venv/bin/azfs"
STATE="${AZFS_STATE_DIR:-/var/lib/azfs}"
SOURCE="$STATE/demo/vfolder"
MOUNTPOINT="${AZFS_DEMO_MOUNTPOINT:-/mnt/azfs-demo}"

mkdir -p "$SOURCE" "$MOUNTPOINT"
if grep -q " $MOUNTPOINT fuse.azfs " /proc/self/mountinfo; then
    echo "azfs: demo vfolder already mounted at $MOUNTPOINT"
else
    "$AZFS" mount --uid 1000 --gid 1000 --quota-bytes 1G --quota-files 10000 \
        "$SOURCE" "$MOUNTPOINT"
fi
echo "hello from azfs" > "$MOUNTPOINT/hello.txt"
echo
echo "A demo vfolder ($SOURCE) is mounted at $MOUNTPOINT:"
ls -l "$MOUNTPOINT"
df -h "$MOUNTPOINT"
echo
echo "Usage (kept incrementally, no scan):"
sleep 1.2
"$AZFS" usage "$SOURCE"
echo
echo "Unmount with: $AZFS umount $MOUNTPOINT"
