"""The manager's records: models, sessions from trio, and migrations."""
