"""Whether an error means the Prefect API stopped answering (its server died or became unreachable mid-run)."""

from __future__ import annotations


def unreachable_api(e: BaseException | None) -> str | None:
    """The API URL when ``e`` (or what caused it) is a failed connection to the Prefect API, else None."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    while e is not None:
        if isinstance(e, httpx.TransportError):
            return PREFECT_API_URL.value() or "(the temporary local server)"
        e = e.__cause__ or e.__context__
    return None
