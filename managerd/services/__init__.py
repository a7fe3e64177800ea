"""The manager's operations, one module per kind of record; the HTTP layer stays thin."""
