"""A whole azfs deployment on one machine, for a first look and for single-node use.

``azfs up`` starts managerd (SQLite), Azurite (standing in for Blob
Storage), optionally etcd, and agentd with its FUSE mount, all detached and
all under one state directory; ``azfs down`` stops them and unmounts
everything below that directory.  Layers: :mod:`azfs.node.layout` (where
things live), :mod:`azfs.node.procs` (detached processes with pid files),
:mod:`azfs.node.services` (each service's command and readiness check),
:mod:`azfs.node.configs` (the daemons' config files),
:mod:`azfs.node.provision` (admin, volume config, sample dataset),
:mod:`azfs.node.deploy` (up/down/status), :mod:`azfs.node.demo` (the
quickstart's walk through the main job).
"""
