"""engine/signals.py in this process: real signals sent with os.kill."""

import os
import signal
import threading

import pytest

from engine import signals


@pytest.fixture(autouse=True)
def default_dispositions():
    """As in a foreground command: a test run started in the background inherits
    SIGINT ignored, and handled() leaves ignored signals ignored."""
    saved = {sig: signal.getsignal(sig) for sig in signals.HANDLED}
    for sig in saved:
        signal.signal(sig, signal.SIG_DFL)
    yield
    for sig, old in saved.items():
        signal.signal(sig, old)


def test_sigterm_raises_interrupted_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as info:
        with signals.handled():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert isinstance(info.value, signals.Interrupted) and info.value.signum == signal.SIGTERM
    assert signals.exit_code(info.value) == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_does_not_break_into_the_cleanup(capfd):
    cleaned = []
    with pytest.raises(signals.Interrupted) as info:
        with signals.handled():
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                for _ in range(1000):
                    pass
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while cleaning up
                for _ in range(1000):
                    pass
                cleaned.append(True)
    assert info.value.signum == signal.SIGHUP and cleaned == [True]
    assert "SIGTERM ignored: already stopping after SIGHUP" in capfd.readouterr().err


def test_a_signal_during_a_commit_is_acted_on_after_it():
    done = []
    with pytest.raises(signals.Interrupted) as info:
        with signals.handled():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
                done.append("committed")
    assert done == ["committed"] and info.value.after_commit
    assert "after backup had committed" in signals.report(info.value, type("A", (), {"command": "backup"})())


def test_worker_threads_stop_at_their_next_check():
    seen = []

    def worker():
        try:
            while True:
                signals.check()
        except signals.Interrupted as e:
            seen.append(e.signum)

    with pytest.raises(signals.Interrupted):
        with signals.handled():
            t = threading.Thread(target=worker)
            t.start()
            try:
                os.kill(os.getpid(), signal.SIGINT)
                t.join(10)
            finally:
                t.join(10)
    assert seen == [signal.SIGINT]
    assert not signals.stopping()  # after the command: nothing is stopping (in-process callers, other tests)


def test_an_interrupted_restore_names_what_it_left(tmp_path):
    """A file target loses only its partial file; a block device is written in
    place, so the message must say it was partly overwritten."""
    interrupted = signals.Interrupted(signal.SIGTERM)
    file_args = type("A", (), {"command": "restore", "target": str(tmp_path / "r.img")})()
    assert signals.report(interrupted, file_args).endswith("its partial file removed; "
                                                           f"{tmp_path / 'r.img'} is as it was")
    device = next((f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith("loop")
                   and n[4:].isdigit()), None)
    if device is None:
        pytest.skip("no /dev/loopN node to stand for a block device target")
    device_args = type("A", (), {"command": "restore", "target": device})()
    text = signals.report(interrupted, device_args)
    assert f"the disk {device} was partly overwritten" in text and "is as it was" not in text
