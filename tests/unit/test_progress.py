import io

from engine.progress import Progress, human_bytes


def test_progress_draws_rate_and_eta_when_enabled():
    out = io.StringIO()
    p = Progress("backup d", enabled=True, stream=out)
    p.set_total(100 << 20)
    p.advance(50 << 20)
    p.finish()
    text = out.getvalue()
    assert "backup d: 50.0 MiB / 100.0 MiB (50%)" in text and "/s" in text and "ETA" in text
    assert text.endswith("\n")


def test_progress_is_silent_when_disabled():
    out = io.StringIO()
    p = Progress("x", enabled=False, stream=out)
    p.advance(10)
    p.finish()
    assert out.getvalue() == ""


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 << 30) == "3.0 GiB"


# -- issue 8, item 11: width, messages, the syncing stage ---------------------------

import logging  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from engine import clilog, progress as progress_mod  # noqa: E402


def _lines(text: str) -> list[str]:
    """What was drawn: the pieces between carriage returns and newlines."""
    return [p for line in text.split("\n") for p in line.split("\r") if p]


def test_progress_line_is_cut_to_the_width_keeping_the_figures():
    out = io.StringIO()
    p = Progress("backup " + "x" * 60, enabled=True, stream=out, width=80)
    p.set_total(100 << 20)
    p.advance(10 << 20)
    p.finish()
    drawn = _lines(out.getvalue())
    assert drawn and all(len(d) <= 79 for d in drawn), drawn
    assert drawn[0].startswith("backup xxx") and "…: 10.0 MiB / 100.0 MiB (10%)" in drawn[0]
    assert out.getvalue().endswith("\n")


def test_reading_done_shows_syncing_not_a_frozen_99_percent():
    out = io.StringIO()
    p = Progress("backup d", enabled=True, stream=out, width=100)
    p.set_total(100 << 20)
    p.advance(99 << 20)
    p.advance(1 << 20)  # within 0.2 s of the last draw: the old code drew nothing
    drawn = _lines(out.getvalue())
    assert "syncing 0:00:00" in drawn[-1] and "100.0 MiB read in" in drawn[-1], drawn
    p.finish()
    assert _lines(out.getvalue())[-1].rstrip().endswith("100.0 MiB in 0:00:00, done")


def test_syncing_stage_keeps_counting(monkeypatch):
    monkeypatch.setattr(progress_mod, "SYNC_TICK", 0.05)
    out = io.StringIO()
    p = Progress("backup d", enabled=True, stream=out, width=100)
    p.set_total(10)
    p.advance(10)
    before = out.getvalue().count("syncing")
    time.sleep(0.5)
    p.finish()
    assert out.getvalue().count("syncing") >= before + 3
    after = out.getvalue()
    time.sleep(0.2)
    assert out.getvalue() == after  # finish stopped the ticker


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def tty(monkeypatch):
    """Replaces sys.stderr by a terminal; called in the test body, since
    pytest's capture resets sys.stderr after fixtures ran."""
    def install():
        fake = _Tty()
        monkeypatch.setattr("sys.stderr", fake)
        clilog.setup()
        return fake
    yield install
    clilog.reset()


def test_a_message_ends_the_progress_line_first(tty):
    tty_stderr = tty()
    p = Progress("restore d@1", stream=tty_stderr, width=80)
    assert p.enabled
    p.set_total(1 << 30)
    p.advance(1 << 20)
    logging.getLogger("blockvault.vsphere").warning("a CBT fallback")
    time.sleep(0.25)
    p.advance(1 << 20)  # drawn again, below the message
    p.finish()
    text = tty_stderr.getvalue()
    lines = text.split("\n")
    assert "blockvault: warning: a CBT fallback" in lines
    i = lines.index("blockvault: warning: a CBT fallback")
    assert lines[i - 1].startswith("\rrestore d@1: 1.0 MiB / 1.0 GiB (0%)")
    assert lines[i + 1].startswith("\rrestore d@1: 2.0 MiB")
    assert text.endswith("\n")


def test_close_after_a_failure_leaves_a_fresh_line(tty):
    tty_stderr = tty()
    with pytest.raises(RuntimeError):
        with Progress("backup d", stream=tty_stderr, width=80) as p:
            p.set_total(100)
            p.advance(10)
            raise RuntimeError("boom")
    logging.getLogger("blockvault").error("boom", extra={"bv_prefix": "error"})
    assert "(10%)" in tty_stderr.getvalue() and tty_stderr.getvalue().endswith("\nblockvault: error: boom\n")
    progress_mod.end_line()  # no progress left registered: nothing written
    assert tty_stderr.getvalue().endswith("\nblockvault: error: boom\n")
