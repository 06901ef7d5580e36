"""Report charts as PNG bytes: funnel, daily trend, cohort table.

matplotlib's object API on the Agg canvas (no pyplot: no global figure state, safe off the event
loop's thread). Chinese labels need a CJK font: a system one when matplotlib knows one that really
has the glyphs, otherwise the Noto Sans CJK SC subset shipped in ``scrm/fonts`` (SIL OFL 1.1; the
3,755 common hanzi plus the labels, ~0.8 MB), so ``pip install .`` alone is enough on a fresh machine.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from scrm.messages import Chart

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from scrm.reports import Cohorts, Funnel, Lang

SHIPPED_FONT = Path(__file__).parent / "fonts" / "scrm-cjk-subset.otf"
#: Families known to carry Chinese; each is still checked for the glyphs before use.
SYSTEM_CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei", "Droid Sans Fallback", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB",
    "Heiti SC", "SimHei", "Noto Sans CJK JP", "Arial Unicode MS",
)
#: Characters a usable font must have (from the labels).
PROBE = "新客户转化率漏斗"
SIZE = (8.0, 5.0)
#: rcParams are process-wide: one chart at a time keeps one chart's font out of another's.
_LOCK = threading.Lock()
DPI = 100


def has_glyphs(path: Path | str, text: str = PROBE) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        charmap = FT2Font(str(path)).get_charmap()
    except (OSError, RuntimeError):
        return False
    return all(ord(ch) in charmap for ch in text)


@functools.cache
def cjk_font(system: bool = True) -> Path:
    """The font file charts use for CJK text; ``system=False`` forces the shipped subset."""
    from matplotlib import font_manager

    if system:
        for entry in sorted(font_manager.fontManager.ttflist, key=lambda e: e.name):
            if entry.name in SYSTEM_CJK_FAMILIES and has_glyphs(entry.fname):
                return Path(entry.fname)
    return SHIPPED_FONT


@functools.cache
def _family(path: Path) -> str:
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


@contextmanager
def _style(font: Path | None) -> Iterator[None]:
    import matplotlib

    family = _family(font or cjk_font())
    with _LOCK, matplotlib.rc_context({"font.family": [family, "DejaVu Sans"], "axes.unicode_minus": False,
                                "font.size": 11, "axes.spines.top": False, "axes.spines.right": False}):
        yield


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=SIZE, dpi=DPI, layout="constrained")


def text_png(text: str, font: Path | None = None, size: tuple[float, float] = (3.0, 1.0)) -> bytes:
    """One line of text on white: what tests read back to see glyphs rather than missing-glyph boxes."""
    from matplotlib.figure import Figure

    with _style(font):
        fig = Figure(figsize=size, dpi=DPI)
        fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=28)
        return _png(fig)


def funnel_png(f: Funnel, lang: Lang = "both", font: Path | None = None,
               by: Literal["variant", "channel"] = "variant") -> bytes:
    """Horizontal funnel of the campaign's steps, one bar group per A/B variant (or per channel, ``by``)
    when there are several."""
    from scrm.reports import STEPS, label

    split = f.by_variant if by == "variant" else f.by_channel
    groups = split if len(split) > 1 else {"": f.total}
    with _style(font):
        fig = _figure()
        ax = fig.add_subplot()
        height = 0.8 / len(groups)
        positions = list(range(len(STEPS)))
        for i, (name, row) in enumerate(groups.items()):
            values = [getattr(row, step) for step in STEPS]
            ys = [p + i * height for p in positions]
            bars = ax.barh(ys, values, height=height * 0.9, label=name or None)
            rates = row.rates()
            for bar, step, value in zip(bars, STEPS, values, strict=True):
                note = f"{value}" + (f"  {rates[step]:.0%}" if step in rates else "")
                ax.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=9)
        ax.set_yticks([p + height * (len(groups) - 1) / 2 for p in positions], [label(s, lang) for s in STEPS])
        ax.invert_yaxis()
        ax.margins(x=0.25)
        ax.set_title(f"{label('funnel', lang)}: {f.campaign}")
        if len(groups) > 1:
            ax.legend(title=label(by, lang), loc="lower right")
        return _png(fig)


def trend_png(series: dict[str, dict[str, int]], lang: Lang = "both", font: Path | None = None) -> bytes:
    """Daily lines (new customers, inbound messages, conversions) over the report period."""
    from scrm.reports import label

    return lines_png({label(key, lang): points for key, points in series.items()}, label("daily_trend", lang),
                     label("day", lang), font)


def lines_png(series: dict[str, dict[str, int]], title: str, xlabel: str = "", font: Path | None = None) -> bytes:
    """Daily lines, one per named series of ``{"MM-DD": value}`` over the same days."""
    with _style(font):
        fig = _figure()
        ax = fig.add_subplot()
        for name, points in series.items():
            ax.plot(range(len(points)), list(points.values()), marker="o", markersize=3, label=name)
        days = list(next(iter(series.values()), {}))
        step = max(1, len(days) // 10)
        ax.set_xticks(range(0, len(days), step), days[::step])
        ax.set_title(title)
        if xlabel:
            ax.set_xlabel(xlabel)
        if series:
            ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        return _png(fig)


def cohort_png(c: Cohorts, lang: Lang = "both", font: Path | None = None) -> bytes:
    """Retention table as a heat map: rows are acquisition weeks, columns weeks since."""
    import numpy as np

    from scrm.reports import label

    weeks = len(c.weeks)
    grid: Any = np.full((weeks, weeks), np.nan)
    for i, row in enumerate(c.retention):
        if c.sizes[i]:
            grid[i, : len(row)] = row
    with _style(font):
        fig = _figure()
        ax = fig.add_subplot()
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(c.retention):
            for n, value in enumerate(row if c.sizes[i] else []):
                ax.text(n, i, f"{value:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if value > 0.6 else "black")
        ax.set_xticks(range(weeks), [f"{label('week', lang)} {n}" for n in range(weeks)], fontsize=8)
        ax.set_yticks(range(weeks), [f"{w:%m-%d} ({n})" for w, n in zip(c.weeks, c.sizes, strict=True)])
        ax.set_title(label("cohort", lang))
        return _png(fig)


def chart(draw: Callable[..., bytes], *args: Any) -> Chart:
    """``draw(*args)`` as a :class:`~scrm.messages.Chart`: drawn when the channel sends it."""
    return Chart(functools.partial(draw, *args))
