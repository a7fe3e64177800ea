"""azfs: per-user virtual folders and blob datasets for compute clusters, served over FUSE."""

__version__ = "0.1.0"
