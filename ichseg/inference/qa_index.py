"""The static, sortable ``index.html`` of a prediction run: one row per scan, linking to its sheet.

:func:`write_qa_index` writes the page atomically from a list of :class:`QARow`;
:func:`qa_index_html` gives its text. The page is a single file with inline CSS and JS (no
external resources), so it opens from disk without a server or network. The contact sheets it
links to are drawn by :mod:`ichseg.inference.qa`, which re-exports these names.
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ichseg.utils.atomic import atomic_write_text


@dataclass(frozen=True)
class QARow:
    """One scan of a prediction run, as the index lists it.

    ``interval_ml`` is an ensemble's member minimum and maximum volume (None for one model);
    ``sheet`` and ``mask`` are paths relative to the index (the sheet PNG and the mask file).
    """

    name: str
    volume_ml: float
    interval_ml: tuple[float, float] | None
    largest_component_ml: float
    components: int
    ich_slices: int
    slices: int
    sheet: str
    mask: str


def _href(path: str) -> str:
    """A relative path as an escaped href; absolute paths and URLs are refused, so the page
    never points outside its folder's tree by scheme or host."""
    text = str(path).replace("\\", "/")
    if text.startswith("/") or "://" in text or ":" in text.split("/", 1)[0]:
        raise ValueError(f"QA index links must be relative paths, got {path!r}")
    return html.escape(urllib.parse.quote(text, safe="/"), quote=True)


def _number(value: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _sort_key(value: float) -> str:
    """A ``data-sort`` value: the number, or empty (sorted last) when it is not finite."""
    return repr(float(value)) if math.isfinite(value) else ""


_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em;
  color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
p.note { color: #555; margin: 0 0 1em; }
table { border-collapse: collapse; background: #fff; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .7em; text-align: left;
  vertical-align: middle; }
th { background: #eee; position: sticky; top: 0; }
th[data-key] { cursor: pointer; user-select: none; }
th[data-key]:hover { background: #e0e0e0; }
th.asc::after { content: " \\25B2"; font-size: .75em; }
th.desc::after { content: " \\25BC"; font-size: .75em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mask { font-size: .85em; color: #666; }
img.sheet { max-height: 120px; max-width: 360px; display: block; }
"""

_JS = """
(function () {
  var table = document.getElementById("qa-table");
  var body = table.tBodies[0];
  var headers = table.querySelectorAll("th[data-key]");
  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-sort");
    if (raw === null) { raw = cell.textContent; }
    if (!numeric) { return raw.toLowerCase(); }
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }
  function sortBy(key, descending) {
    var header = null, index = -1;
    for (var i = 0; i < headers.length; i++) {
      headers[i].classList.remove("asc", "desc");
      if (headers[i].getAttribute("data-key") === key) { header = headers[i]; }
    }
    if (header === null) { return false; }
    index = header.cellIndex;
    var numeric = header.getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row, position) { row._position = position; });
    rows.sort(function (a, b) {
      var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
      if (x === null || y === null) {
        if (x === y) { return a._position - b._position; }
        return x === null ? 1 : -1;  /* missing values last either way */
      }
      var order = x < y ? -1 : (x > y ? 1 : 0);
      if (descending) { order = -order; }
      return order !== 0 ? order : a._position - b._position;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    header.classList.add(descending ? "desc" : "asc");
    table.setAttribute("data-sorted", (descending ? "-" : "") + key);
    return true;
  }
  for (var i = 0; i < headers.length; i++) {
    headers[i].addEventListener("click", function (event) {
      var header = event.currentTarget, key = header.getAttribute("data-key");
      var descending;
      if (header.classList.contains("asc")) { descending = true; }
      else if (header.classList.contains("desc")) { descending = false; }
      else { descending = header.getAttribute("data-type") === "number"; }
      sortBy(key, descending);
      if (window.history && history.replaceState) {
        history.replaceState(null, "", "#sort=" + (descending ? "-" : "") + key);
      }
    });
  }
  var match = /(?:^#|&)sort=(-?)([A-Za-z_]+)/.exec(window.location.hash);
  if (!(match && sortBy(match[2], match[1] === "-"))) { sortBy("volume", true); }
})();
"""

#: Sortable columns: key, header, type.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "scan", "text"),
    ("volume", "volume (mL)", "number"),
    ("interval", "interval (mL)", "number"),
    ("largest", "largest component (mL)", "number"),
    ("components", "components", "number"),
    ("slices", "ICH slices / slices", "number"),
)


def _row_html(row: QARow) -> str:
    name = html.escape(row.name, quote=True)
    sheet = _href(row.sheet)
    mask = _href(row.mask)
    if row.interval_ml is None:
        interval, interval_key = "–", ""
    else:
        low, high = (float(v) for v in row.interval_ml)
        interval = f"{_number(low, 1)} – {_number(high, 1)}"
        interval_key = _sort_key(low)
    cells = [
        f'<td data-sort="{name}"><a href="{sheet}">{name}</a></td>',
        f'<td class="num" data-sort="{_sort_key(row.volume_ml)}">{_number(row.volume_ml)}</td>',
        f'<td class="num" data-sort="{interval_key}">{html.escape(interval)}</td>',
        f'<td class="num" data-sort="{_sort_key(row.largest_component_ml)}">'
        f"{_number(row.largest_component_ml)}</td>",
        f'<td class="num" data-sort="{int(row.components)}">{int(row.components)}</td>',
        f'<td class="num" data-sort="{int(row.ich_slices)}">'
        f"{int(row.ich_slices)} / {int(row.slices)}</td>",
        f'<td class="mask"><a href="{mask}">{html.escape(Path(row.mask).name)}</a></td>',
        f'<td><a href="{sheet}"><img class="sheet" src="{sheet}" loading="lazy" '
        f'alt="QA sheet of {name}"></a></td>',
    ]
    volume = _sort_key(row.volume_ml)
    return f'<tr data-name="{name}" data-volume="{volume}">' + "".join(cells) + "</tr>"


def _default_order(rows: Sequence[QARow]) -> list[QARow]:
    """By volume, largest first (non-finite volumes last), ties in the given order."""

    def key(row: QARow) -> tuple[int, float]:
        value = float(row.volume_ml)
        return (0, -value) if math.isfinite(value) else (1, 0.0)

    return sorted(rows, key=key)


def qa_index_html(
    rows: Sequence[QARow], title: str = "ichseg predictions", note: str | None = None
) -> str:
    """The text of :func:`write_qa_index`'s page."""
    ordered = _default_order(rows)
    headers = []
    for key, label, kind in _COLUMNS:
        css = ' class="desc"' if key == "volume" else ""
        headers.append(f'<th data-key="{key}" data-type="{kind}"{css}>{html.escape(label)}</th>')
    headers += ["<th>mask</th>", "<th>sheet</th>"]
    total = sum(float(r.volume_ml) for r in rows if math.isfinite(r.volume_ml))
    with_ich = sum(1 for r in rows if r.ich_slices > 0)
    summary = (
        f"{len(rows)} scan{'' if len(rows) == 1 else 's'}, {with_ich} with predicted ICH; "
        f"{total:.2f} mL in all. Click a column header to sort."
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts += [
        f'<p class="note">{html.escape(summary)}</p>',
        '<table id="qa-table" data-sorted="-volume">',
        "<thead><tr>" + "".join(headers) + "</tr></thead>",
        "<tbody>",
        *(_row_html(row) for row in ordered),
        "</tbody>",
        "</table>",
        f"<script>{_JS}</script>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def write_qa_index(
    rows: Sequence[QARow],
    target: Path,
    title: str = "ichseg predictions",
    note: str | None = None,
) -> None:
    """Write one static, self-contained ``index.html`` listing ``rows`` atomically.

    A table (id ``qa-table``) with a row per scan (``data-name`` and ``data-volume`` attributes):
    the name linking to its sheet, the volume in mL, the ensemble interval (or "–"), the largest
    component in mL, the number of components, ICH slices / slices, the mask file and a lazy
    thumbnail of the sheet. Rows are sorted by volume, largest first, in the HTML itself; clicking
    a header sorts by that column (again to reverse it), and a ``#sort=<key>`` or
    ``#sort=-<key>`` fragment (keys: name, volume, interval, largest, components, slices) picks
    the order on load. No external resources: inline CSS and JS only.
    """
    atomic_write_text(Path(target), qa_index_html(rows, title=title, note=note))


__all__ = ["QARow", "qa_index_html", "write_qa_index"]
