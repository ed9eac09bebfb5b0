"""Reading what the tools write, as a user would: the `python -m trainer` command line in this process,
PNG sizes from their headers, and HTML pages parsed into their text, images and figures."""

from __future__ import annotations

import contextlib
import io
import struct
from html.parser import HTMLParser
from pathlib import Path

from trainer.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


class PageParser(HTMLParser):
    """Every <img> src and every gallery <figure> (its data-* attributes, image sources and caption text)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.figures: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"attrs": attrs, "images": [], "text": []})
        elif tag == "img":
            self.images.append(attrs)
            if self.figures and self.figures[-1].get("open", True):
                self.figures[-1]["images"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figures[-1]["open"] = False

    def handle_data(self, data):
        self.text.append(data)
        if self.figures and self.figures[-1].get("open", True):
            self.figures[-1]["text"].append(data)
