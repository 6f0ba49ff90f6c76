"""A report as a list of blocks, rendered to Markdown (images as files) and to one self-contained HTML file
(images embedded as data URIs, so the file can be mailed or archived alone)."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl


@dataclass
class Block:
    """kind: "h1" | "h2" | "h3" | "p" | "table" | "image" | "gallery"."""

    kind: str
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    path: str = ""  # image path relative to the report's folder
    items: list[tuple[str, str]] = field(default_factory=list)  # gallery: (path, caption)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4f}"
    return "—" if v is None else str(v)


class Document:
    """Blocks added in reading order; `base` is the folder image paths are relative to."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.blocks: list[Block] = []

    def h1(self, text: str) -> None:
        self.blocks.append(Block("h1", text))

    def h2(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def h3(self, text: str) -> None:
        self.blocks.append(Block("h3", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def table(self, frame: pl.DataFrame) -> None:
        self.blocks.append(Block("table", columns=list(frame.columns), rows=[[fmt(v) for v in r] for r in frame.iter_rows()]))

    def image(self, path: Path | None, caption: str = "") -> None:
        if path is not None:
            self.blocks.append(Block("image", caption, path=self._rel(path)))

    def gallery(self, items: list[tuple[Path, str]]) -> None:
        if items:
            self.blocks.append(Block("gallery", items=[(self._rel(p), c) for p, c in items]))

    def extend(self, other: Document) -> None:
        """Append another document's blocks (paths re-based onto this document's folder)."""
        for b in other.blocks:
            b = Block(**asdict(b))
            if b.path:
                b.path = self._rel(other.base / b.path)
            b.items = [(self._rel(other.base / p), c) for p, c in b.items]
            self.blocks.append(b)

    def _rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.base.resolve()))
        except ValueError:
            return str(path)

    def save_json(self, path: Path) -> None:
        path.write_text(json.dumps([asdict(b) for b in self.blocks], indent=1))

    @classmethod
    def load_json(cls, path: Path) -> Document:
        doc = cls(path.parent)
        doc.blocks = [Block(**{**b, "items": [tuple(i) for i in b["items"]]}) for b in json.loads(path.read_text())]
        return doc

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b.kind in ("h1", "h2", "h3"):
                out.append("#" * int(b.kind[1]) + " " + b.text + "\n")
            elif b.kind == "p":
                out.append(b.text + "\n")
            elif b.kind == "table":
                out.append("| " + " | ".join(b.columns) + " |\n|" + "|".join("---" for _ in b.columns) + "|\n"
                           + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in b.rows))
            elif b.kind == "image":
                out.append(f"![{b.text}]({b.path})\n")
            elif b.kind == "gallery":
                out.append(" ".join(f"![{c}]({p})" for p, c in b.items) + "\n")
        return "\n".join(out)

    def _data_uri(self, rel: str) -> str:
        data = (self.base / rel).read_bytes() if (self.base / rel).exists() else b""
        return "data:image/png;base64," + base64.b64encode(data).decode()

    def html(self, title: str) -> str:
        parts = []
        for b in self.blocks:
            if b.kind in ("h1", "h2", "h3"):
                parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
            elif b.kind == "p":
                parts.append(f"<p>{_inline(b.text)}</p>")
            elif b.kind == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b.columns)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in b.rows)
                parts.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
            elif b.kind == "image":
                parts.append(f"<figure><img src='{self._data_uri(b.path)}' alt='{html.escape(b.text)}'>"
                             f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
            elif b.kind == "gallery":
                cells = "".join(f"<figure><img src='{self._data_uri(p)}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}"
                                "</figcaption></figure>" for p, c in b.items)
                parts.append(f"<div class='gallery'>{cells}</div>")
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>")

    def write(self, stem: Path, title: str) -> tuple[Path, Path]:
        """Write `<stem>.md`, `<stem>.html` and `<stem>.json`; returns the Markdown and HTML paths."""
        md, page = stem.with_suffix(".md"), stem.with_suffix(".html")
        md.write_text(self.markdown())
        page.write_text(self.html(title))
        self.save_json(stem.with_suffix(".json"))
        return md, page


def _inline(text: str) -> str:
    """Escape, then allow **bold** and `code` as in the Markdown version."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1180px;margin:0 auto;padding:24px 28px;background:#fff;min-height:100vh}
h1{font-size:1.6rem;border-bottom:2px solid #e3e6ea;padding-bottom:6px}h2{margin-top:2rem;font-size:1.25rem}
h3{font-size:1.05rem;color:#3a4556}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #d9dde3;padding:4px 8px;text-align:right}
th{background:#eef1f5}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto}
figure{margin:.6rem 0}img{max-width:100%;border:1px solid #e3e6ea}figcaption{font-size:.8rem;color:#5b6575}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
"""
