"""Remote volumes: their config, where it is stored, and mounting them on a host.

A *remote volume* is a filesystem that holds vfolders (an Azure Files share
over cifs, a local directory for single-node installs, any other kernel
filesystem).  Its config uses the concept's scheme (``volumes: [{name,
mount: {at, fstype, path, options}}]``).

Modules and the names other packages rely on:

* :mod:`azfs.volumes.model` — ``Volume`` (frozen; ``.name``, ``.mount.at`` in
  ``startup|requested``, ``.mount.fstype``, ``.mount.path``, ``.mount.options``
  *without* secrets, ``.mount.password: Secret | None``),
  ``VolumeConfigError(UserError)`` whose message names the entry and field
  (``volumes[1].mount.at: must be 'startup' or 'requested'``),
  ``parse_volumes(document)`` and ``dump_volumes(volumes, show_secrets=False)``
  (passwords as ``***`` unless asked), ``load_yaml_text``/``load_yaml_file``.
* :mod:`azfs.volumes.base` — the abstract ``VolumeStore`` and what the stores
  share; the stores import only it, :mod:`azfs.volumes.store` re-exports it.
* :mod:`azfs.volumes.store` — the abstract ``VolumeStore`` (``list``, ``get``
  raising ``azfs.errors.NotFound``, ``replace_all``, ``import_volumes``,
  ``remove``, ``watch(callback) -> Watch``, ``close``; all writes validated and
  atomic; blocking, so daemons call them through ``trio.to_thread``) and
  ``open_store(etcd=None, config_file=None)`` which falls back to
  ``$AZFS_ETCD`` / ``$AZFS_VOLUMES_FILE`` / ``/etc/azfs/volumes.yaml``.
* :mod:`azfs.volumes.etcd_store` / :mod:`azfs.volumes.yaml_store` — the two
  stores (etcd for a cluster; a YAML file as the single-node default).  The
  etcd store takes several members (``h1:2379,h2:2379``), TLS and a login
  (``EtcdAuth``, from ``$AZFS_ETCD_*`` by default) and an optional
  ``cache_file`` that serves reads during an etcd outage.
* :mod:`azfs.volumes.etcd_client` — endpoints, ``EtcdAuth`` and
  ``connect_first`` (a client of the first member that answers), shared with
  the agent's registration and the manager's agent lookup.
* :mod:`azfs.volumes.hostmount` — ``HostMounter(state_dir, uid, gid)``: async
  refcounted ``acquire``/``release`` of host mounts at
  ``state_dir/volumes/<name>``, ``mount_startup``, ``mounts()``, ``path_for``,
  ``release_all``; plus ``is_stale(path)``, ``lazy_unmount(path)`` and
  ``unmount(path)``.  ``plan_mount`` is the pure "what would mount(8) run".
* :mod:`azfs.volumes.mountinfo` — what is mounted, read from
  ``/proc/self/mountinfo`` (never remembered blindly).

Secrets (cifs passwords) never appear in ``options``, logs, errors, a command
line, a child's environment or ``/proc/mounts``.
"""
