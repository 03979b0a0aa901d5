"""Progress by default: silent without a terminal, a delayed bar (counts, ETA) with one."""

from __future__ import annotations

import io

import causalpatch.assemble as assemble


def test_auto_progress_is_silent_without_a_terminal(monkeypatch):
    monkeypatch.setattr(assemble, "_interactive", lambda: False)
    tick, close = assemble.progress_callback(None, 10)
    assert tick is None
    close()


def test_auto_progress_shows_a_delayed_bar_in_a_terminal(monkeypatch):
    monkeypatch.setattr(assemble, "_interactive", lambda: True)
    made = {}
    import tqdm.auto

    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        made.update(kwargs)
        return real(*args, file=io.StringIO(), **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    tick, close = assemble.progress_callback(None, 10, "patching")
    assert tick is not None
    tick(4)
    close()
    assert made["total"] == 10 and made["delay"] == assemble.PROGRESS_DELAY_S
    # progress=True shows the bar at once; a callback gets (done, total)
    assemble.progress_callback(True, 3)[1]()
    assert made["delay"] == 0.0
    seen = []
    tick, _ = assemble.progress_callback(lambda d, t: seen.append((d, t)), 5)
    tick(2)
    tick(3)
    assert seen == [(2, 5), (5, 5)]
