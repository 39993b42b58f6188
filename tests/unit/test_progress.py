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
