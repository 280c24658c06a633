"""The writer daemon: commit pipeline, announcement server, admin API, build jobs."""
