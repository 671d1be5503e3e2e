"""Prefect flows (one per DVC stage) and the ``damagenet`` CLI. Flows orchestrate; the computing is elsewhere."""

import os

# Flows run on Prefect's temporary local server unless PREFECT_API_URL points at one; no telemetry (no network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
