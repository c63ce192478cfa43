"""The report's two renderings of one document (a list of blocks: ("h1", text), ("h2", text), ("p", text),
("list", items), ("img", file, alt), ("table", head, rows), ("examples", rows)): Markdown with the figures
beside it, and one self-contained HTML page with the figures inlined. Used by dreamtune.report only.
"""

from __future__ import annotations

import base64
import html


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(doc: list[tuple]) -> str:
    out = []
    for block in doc:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(block[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in block[1]) + "\n")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n")
        elif kind == "table":
            _, head, rows = block
            out.append("| " + " | ".join(map(_md_cell, head)) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "examples":
            out.append("| prompt | answer | base | tuned |\n|---|---|---|---|")
            for r in block[1]:
                out.append(f"| {_md_cell(r.get('prompt', ''))} | {_md_cell(r.get('answer', ''))} | "
                           f"{_mark(r.get('base_correct'))}{_md_cell(r.get('base', ''))} | "
                           f"{_mark(r.get('tuned_correct'))}{_md_cell(r.get('tuned', ''))} |")
            out.append("")
    return "\n".join(out)


def _mark(correct) -> str:
    return "" if correct is None else ("✓ " if correct else "✗ ")


def _prompt_text(prompt) -> str:
    """A comparison row's prompt: a string, or chat messages shown as their contents."""
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    return str(prompt)


CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;vertical-align:top;text-align:left}
th{background:#f4f4f4}pre{margin:0;white-space:pre-wrap;font-size:.85rem}img{max-width:100%;display:block;margin:1rem 0}
.ok{background:#eaf7ea}.bad{background:#fbeaea}code{background:#f4f4f4;padding:0 .2rem}"""


def render_html(doc: list[tuple], images: dict[str, bytes]) -> str:
    """One self-contained page: CSS inline, figures as data: URIs."""
    e = html.escape
    code = lambda s: e(s).replace("`", "")  # noqa: E731  (the Markdown's `code` marks are dropped in HTML)
    parts = []
    title = next((b[1] for b in doc if b[0] == "h1"), "dreamtune report")
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{code(block[1])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            parts.append(f'<img alt="{e(block[2])}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            _, head, rows = block
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
        elif kind == "examples":
            rows = []
            for r in block[1]:
                cells = [f"<td><pre>{e(_prompt_text(r.get('prompt', '')))}</pre></td>", f"<td><pre>{e(str(r.get('answer', '')))}</pre></td>"]
                for side in ("base", "tuned"):
                    ok = r.get(f"{side}_correct")
                    cls = "" if ok is None else (' class="ok"' if ok else ' class="bad"')
                    cells.append(f"<td{cls}><pre>{e(_mark(ok) + str(r.get(side, '')))}</pre></td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("<table><tr><th>prompt</th><th>answer</th><th>base</th><th>tuned</th></tr>" + "".join(rows) + "</table>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{CSS}</style></head>"
            f"<body>\n" + "\n".join(parts) + "\n</body></html>\n")
