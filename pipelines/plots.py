"""``damagenet plots``: DVC's plots rendered offline.

``dvc plots show`` writes an HTML page whose CSV curves are Vega-Lite specs that the browser draws with scripts from
a CDN, so offline they are blank. This asks DVC for the same specs (``dvc plots show --json``) and renders each to
SVG with ``vl-convert`` (Vega bundled, no network), next to an index page that embeds them and DVC's image plots.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _dvc_plots(targets: list[str], scratch: str) -> dict:
    """DVC's plot specs; image plots are copied into ``scratch`` (DVC writes them into the working folder else)."""
    run = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", scratch, *targets],
                         capture_output=True, text=True)
    try:
        return json.loads(run.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"dvc plots show failed: {run.stderr.strip() or run.stdout.strip()}") from None


def render_plots(out_dir: str | Path = "reports/plots", targets: list[str] | None = None) -> list[Path]:
    """Every plot DVC knows (or ``targets``) as a file under ``out_dir`` plus ``index.html``; returns the files."""
    import vl_convert

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        shown = _dvc_plots(targets or [], scratch)
        images = {e["url"]: Path(e["url"]).read_bytes() for entries in shown.get("data", {}).values()
                  for e in entries if e["type"] == "image"}
    written, items = [], []
    for name, entries in sorted(shown.get("data", {}).items()):
        for entry in entries:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            if entry["type"] == "vega":
                path = out / f"{stem}.svg"
                path.write_text(vl_convert.vegalite_to_svg(entry["content"]))
                items.append((name, f'<img src="{path.name}" alt="{html.escape(name)}">'))
                written.append(path)
            elif entry["type"] == "image":  # inline: the page stays one file with the SVGs beside it
                uri = "data:image/png;base64," + base64.b64encode(images[entry["url"]]).decode()
                items.append((name, f'<img src="{uri}" alt="{html.escape(name)}" style="max-width:100%">'))
    problems = [f"{e['name']}: {e['msg'].splitlines()[0]}" for e in shown.get("errors", [])]
    body = "\n".join(f"<h2>{html.escape(n)}</h2>\n{tag}" for n, tag in items)
    notes = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    index = out / "index.html"
    index.write_text("<!doctype html><html><head><meta charset='utf-8'><title>DVC plots</title></head><body>"
                     "<h1>DVC plots (rendered offline)</h1>" + body
                     + (f"<h2>Not shown</h2><ul>{notes}</ul>" if notes else "") + "</body></html>\n")
    return [*written, index]
