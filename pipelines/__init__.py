"""Prefect flows (one per DVC stage) and the ``damagenet`` CLI. Flows orchestrate; the computing is elsewhere."""

import os

# Flows run on Prefect's temporary local server unless PREFECT_API_URL points at one; no telemetry (no network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the first start migrates Prefect's SQLite database: on a busy 2-core machine that can exceed the 20 s default
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a Prefect API that goes away should end a run in seconds, naming it, not after minutes of backed-off retries
# (Prefect's default, 5 retries of 2-32 s each, kept a dead server's run alive for 6 minutes): one retry after 2 s
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
# run logs are progress, not errors: they go to stdout, so stderr holds what went wrong (one line for bad input)
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.stdout")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_DEBUG_STREAM", "ext://sys.stdout")  # Prefect's own services' log
