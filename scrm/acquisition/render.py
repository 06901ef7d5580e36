"""A channel code as an image: PNG for screens and chat, SVG for print, a poster size for A4 prints.

segno draws the QR code of what the code's URL is (WeChat's QR content URL, WeCom's contact-me link,
the Telegram deep link) with error correction level M and the standard quiet zone of 4 modules.
"""

from __future__ import annotations

import io
from typing import Literal

import segno

Format = Literal["png", "svg"]
#: Pixels a module: a screen-size code, and a poster one (about 12 cm across at 300 dpi for WeChat's URLs).
SCALE = 8
POSTER_SCALE = 40
CONTENT_TYPES: dict[Format, str] = {"png": "image/png", "svg": "image/svg+xml"}


def image(url: str, fmt: Format = "png", *, poster: bool = False) -> bytes:
    """The code's image bytes; ``poster`` draws it large enough to print on a poster."""
    code = segno.make(url, error="m", micro=False)
    out = io.BytesIO()
    code.save(out, kind=fmt, scale=POSTER_SCALE if poster else SCALE, border=4)
    return out.getvalue()
