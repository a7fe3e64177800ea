"""azfs-agentd, the node agent: host volumes, the node's FUSE process, the export API.

Layout: :mod:`agentd.main` (process, signals, sockets) → :mod:`agentd.api`
(HTTP edge) → :mod:`agentd.exports` (what an export is) → host mounting
(:mod:`azfs.volumes.hostmount`) and :mod:`agentd.fuseclient` → the separate
FUSE process :mod:`agentd.fusehost`.  :mod:`agentd.journal` records every
export; :mod:`agentd.agent` wires the parts and restores them at start.
"""
