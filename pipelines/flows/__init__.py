"""One Prefect flow per DVC stage; each takes the arguments :mod:`pipelines.stages` builds from the parameters.

Flow-run names and artifact keys carry the profile, so Prefect's views keep the demo, real and other runs apart."""

import re


def artifact_key(profile: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``name`` in ``profile``."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{profile}-{name}".lower())
