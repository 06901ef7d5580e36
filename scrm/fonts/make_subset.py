"""Rebuild ``scrm-cjk-subset.otf``, the CJK font charts fall back to when the system has none.

    python -m scrm.fonts.make_subset /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc

Source: Noto Sans CJK SC (SIL OFL 1.1, Debian ``fonts-noto-cjk``). Kept: ASCII, CJK punctuation and
full-width forms, the 3,755 GB2312 level-1 hanzi (the common ones, so campaign and tag names in
chart titles render too) and every CJK character in the report labels. Needs fontTools (a
matplotlib dependency); not run at install time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection, TTFont

FAMILY = "SCRM CJK Subset"
OUT = Path(__file__).with_name("scrm-cjk-subset.otf")


def characters() -> set[int]:
    from scrm.reports import LABELS

    chars = set(range(0x20, 0x7F)) | set(range(0x3000, 0x3020)) | set(range(0xFF01, 0xFF5F)) | {0x2026, 0x00B7}
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            if hi == 0xD7 and lo > 0xF9:
                break
            chars.add(ord(bytes([hi, lo]).decode("gb2312")))
    chars |= {ord(ch) for zh, en in LABELS.values() for ch in zh + en}
    return chars


def build(source: Path, index: int = 2) -> Path:
    """``index`` 2 is the SC face of NotoSansCJK-Regular.ttc."""
    font = TTCollection(str(source)).fonts[index] if source.suffix == ".ttc" else TTFont(str(source))
    options = subset.Options()
    options.layout_features = []
    options.hinting = False
    options.name_IDs = [0, 1, 2, 3, 4, 5, 6, 13, 14]
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=characters())
    subsetter.subset(font)
    names = font["name"]
    for record in names.names:
        if record.nameID in (1, 4):
            names.setName(FAMILY if record.nameID == 1 else f"{FAMILY} Regular", record.nameID,
                          record.platformID, record.platEncID, record.langID)
        elif record.nameID in (3, 6):
            names.setName("SCRMCJKSubset-Regular", record.nameID, record.platformID, record.platEncID, record.langID)
    font["CFF "].cff.fontNames = ["SCRMCJKSubset-Regular"]
    font.save(str(OUT))
    return OUT


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
