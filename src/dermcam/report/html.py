"""The page's building blocks: escaping, data: URIs, tables, figures, sections and the page itself.

Safe by default, as template engines are: every helper escapes what it is given unless it is
:class:`Markup` (HTML built by these helpers), so a class, file or data set name such as
``<img src=x onerror=...>`` is shown as text, never run. A handful of functions is all the report
needs, so no template engine is added as a dependency.

The page works offline and from the file system: images are embedded as ``data:`` URIs, the styles
are inline, there is no script, and its Content-Security-Policy (:data:`CSP`) forbids loading
anything else, so a reference to the network would be blocked (and reported by the browser test).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence

from dermcam.evaluate.metrics import format_value

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #f6f7f9; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 8px 24px 48px; }
header { background: #1d2a44; color: #fff; padding: 20px 24px; }
header h1 { margin: 0 auto; max-width: 1120px; font-size: 22px; }
header p { margin: 4px auto 0; max-width: 1120px; color: #c9d3e6; }
.warning { background: #fff4d6; border: 1px solid #e7c15b; border-radius: 6px; padding: 8px 12px; margin: 16px 0; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 4px 20px 16px; margin: 16px 0; }
h2 { font-size: 18px; margin: 14px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e4e7ec; padding: 4px 10px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f2f6; font-weight: 600; }
caption { caption-side: bottom; text-align: left; color: #5b6475; font-size: 13px; padding-top: 4px; }
.ci, .muted { color: #5b6475; font-size: 13px; }
.kv th { text-align: left; width: 14em; background: none; font-weight: 600; }
.kv td { text-align: left; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 8px 32px; }
.figures { display: flex; gap: 16px; align-items: flex-start; }
.figures figure { flex: 0 1 auto; min-width: 0; }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7ec; }
figcaption { color: #5b6475; font-size: 13px; }
.headline { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0; }
.headline div { border: 1px solid #dde1e8; border-radius: 6px; padding: 8px 14px; flex: 1 1 0; min-width: 140px; }
.headline b, .headline span { display: block; }
.headline b { font-size: 22px; }
.headline .ci { min-height: 1.2em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px; }
.case { border: 1px solid #dde1e8; border-radius: 6px; padding: 8px; }
.case.error { border-color: #e3a3a3; background: #fff8f8; }
.case .pair { display: flex; gap: 4px; }
.case .pair img { width: 50%; height: auto; image-rendering: auto; }
.case p { margin: 6px 0 0; font-size: 13px; }
"""


class Markup(str):
    """HTML built by these helpers: already escaped, inserted as it is."""


def esc(value: object) -> Markup:
    """``value`` as HTML text (``<``, ``>``, ``&`` and quotes escaped); :class:`Markup` as it is."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[object], separator: str = "\n") -> Markup:
    """Several fragments, each escaped unless it is Markup."""
    return Markup(separator.join(esc(p) for p in parts))


def _attributes(attributes: dict[str, object]) -> str:
    """`` key="value"`` pairs; ``class_`` stands for ``class``, None drops an attribute."""
    return "".join(f' {key.rstrip("_")}="{esc(value)}"' for key, value in attributes.items() if value is not None)


def tag(name: str, *content: object, **attributes: object) -> Markup:
    """``<name attr="...">content</name>``, the content escaped unless it is Markup."""
    return Markup(f"<{name}{_attributes(attributes)}>{join(content, '')}</{name}>")


def number(value: object, digits: int = 3) -> str:
    """``0.781``; ``-`` for a missing or undefined value; whole numbers as they are; never ``-0.000``.
    The terminal's format (:func:`dermcam.evaluate.metrics.format_value`), so page and CLI agree."""
    return format_value(value, digits)


def with_ci(value: object, interval: Sequence[float] | None) -> Markup:
    """``0.781 (0.752-0.809)``: the value and, when there is one, its 95% interval."""
    if not interval or value is None:
        return esc(number(value))
    return join([number(value), tag("span", f"({number(interval[0])}-{number(interval[1])})", class_="ci")], " ")


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(png: bytes, alt: str, **attributes: object) -> Markup:
    """An ``<img>`` whose PNG is embedded in the page."""
    return Markup(f"<img{_attributes({'src': data_uri(png), 'alt': alt, **attributes})}>")


def figure(png: bytes, alt: str, caption: object = None) -> Markup:
    return tag("figure", image(png, alt), tag("figcaption", caption) if caption else "")


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], caption: object = None,
          class_: str | None = None) -> Markup:
    """A table; every cell escaped unless it is Markup (e.g. :func:`with_ci`)."""
    head = tag("tr", *(tag("th", h) for h in headers))
    body = join(tag("tr", *(tag("td", cell) for cell in row)) for row in rows)
    return tag("table", tag("caption", caption) if caption else "", tag("thead", head), tag("tbody", body),
               class_=class_)


def key_values(items: Iterable[tuple[object, object]]) -> Markup:
    """A two-column table of names and values (configuration, versions)."""
    return tag("table", tag("tbody", join(tag("tr", tag("th", k), tag("td", v)) for k, v in items)), class_="kv")


def columns(*blocks: object) -> Markup:
    """Blocks side by side where the page is wide enough, one under the other where it is not."""
    return tag("div", *(tag("div", b) for b in blocks), class_="columns")


def paragraph(*content: object, class_: str | None = None) -> Markup:
    return tag("p", *content, class_=class_)


class Section:
    """One section of the page: its ``id`` (what links and the structure test look for), title and content."""

    def __init__(self, section_id: str, title: str, *body: object) -> None:
        self.id, self.title, self.body = section_id, title, body

    def html(self) -> Markup:
        return tag("section", tag("h2", self.title), *self.body, id=self.id)


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: a table of contents, the sections, inline styles, the Content-Security-Policy;
    no script and nothing external."""
    contents = tag("nav", paragraph(join((tag("a", s.title, href=f"#{s.id}") for s in sections), " · ")))
    return ("<!DOCTYPE html>\n"
            + tag("html",
                  tag("head", Markup('<meta charset="utf-8">'),
                      Markup(f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'),
                      Markup('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                      tag("title", title), tag("style", Markup(STYLE))),
                  tag("body", tag("header", tag("h1", title), tag("p", subtitle)),
                      tag("main", contents, *(s.html() for s in sections))),
                  lang="en")
            + "\n")
