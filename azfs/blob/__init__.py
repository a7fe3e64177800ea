"""Blob datasets: source URLs, SAS handling, the HTTP data path and read-ahead."""
