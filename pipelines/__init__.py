"""Prefect flows (one per DVC stage) and the ``damagenet`` CLI. Flows orchestrate; the computing is elsewhere."""

import os

# Flows run on Prefect's temporary local server unless PREFECT_API_URL points at one; no telemetry (no network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the first start migrates Prefect's SQLite database: on a busy 2-core machine that can exceed the 20 s default
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
