"""Keeping workers running: the Supervisor, one WorkerPool per worker, its instances, builds,
health checks, and the changes (files, signals) that drive them."""
