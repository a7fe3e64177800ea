"""azfs-managerd: the control plane of vfolders, datasets, users and kernel exports.

Layers, top to bottom: ``app`` (HTTP routes, errors as JSON) → ``services``
(one module per kind of record; the rules) → ``db`` (SQLAlchemy models,
sessions from trio, Alembic migrations) and ``volumes`` / ``agent_client`` /
``sas`` (storage, agents, Azure) — each reached only through its module.
"""
