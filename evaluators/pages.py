"""Building blocks of the report pages: Markdown tables, PNG figures, pages rendered from the templates in
``evaluators/templates`` (the prose lives there, the numbers come in as arguments), and Markdown to self-contained
HTML."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import jinja2
import markdown
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    # a block tag's own line leaves nothing in the page; Markdown, not HTML: nothing to escape
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    undefined=jinja2.StrictUndefined)


def render_template(name: str, **context: Any) -> str:
    return TEMPLATES.get_template(name).render(**context)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table whose columns of numbers are right-aligned and the others left-aligned."""
    def numeric(column: int) -> bool:
        cells = [str(r[column]) for r in rows if str(r[column]) not in ("", "-")]
        return bool(cells) and all(re.match(r"[-+]?\d", c) for c in cells)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "".join("---:|" if numeric(i) else ":---|" for i in range(len(header)))]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render_html(md_text: str, title: str, base: Path) -> str:
    """Markdown to a self-contained HTML page: local images under ``base`` become data URIs."""
    body = markdown.markdown(md_text, extensions=["tables"])

    def inline(m: re.Match) -> str:
        path = base / m.group(1)
        if not path.is_file():
            return m.group(0)
        kind = "svg+xml" if path.suffix == ".svg" else path.suffix.lstrip(".").replace("jpg", "jpeg")
        return f'src="data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="(?!data:|https?:)([^"]+)"', inline, body)
    return render_template("page.html.j2", title=title, body=body)
