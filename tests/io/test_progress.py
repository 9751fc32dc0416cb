"""The conversion progress bar: drawn on a terminal (tqdm, or a plain line without it), silent otherwise."""

import io
import sys

from bitlm.io.progress import Progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_bar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    out = Tty()
    with Progress(4, "converting", stream=out) as bar:
        for _ in range(4):
            bar.update()
    text = out.getvalue()
    assert "converting [" in text and "4/4" in text and text.endswith("\r")


def test_tqdm_bar():
    out = Tty()
    with Progress(3, "converting", stream=out) as bar:
        bar.update(3)
    assert "converting" in out.getvalue()


def test_silent_when_not_a_terminal():
    out = io.StringIO()
    with Progress(3, "converting", stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_disabled_on_a_terminal():
    out = Tty()
    with Progress(3, "converting", stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""
