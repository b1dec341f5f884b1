"""Progress when output is not a terminal: lines at a bounded rate, then a final line."""

from __future__ import annotations

import io

from instructretro.progress import LineProgress, progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_log_stream_gets_a_line_per_interval_and_a_final_line():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=100, desc="embed", unit="chunk", interval=30.0, stream=out, clock=clock)
    assert isinstance(bar, LineProgress)
    for _ in range(100):  # one item per second: 100 s of work
        clock.now += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["embed: 30/100 (30%) 1.0 chunk/s ETA 1m10s",
                         "embed: 60/100 (60%) 1.0 chunk/s ETA 40s",
                         "embed: 90/100 (90%) 1.0 chunk/s ETA 10s"]
    assert lines[3] == "embed: 100/100 (100%) in 1m40s, 1.0 chunk/s"
    assert len(lines) == 4


def test_rate_is_bounded_however_fast_the_updates():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(range(10_240), desc="add-index", unit="block", interval=5.0, stream=out, clock=clock)
    for _ in bar:
        clock.now += 1 / 1024  # 10 s of work in 10k updates (exact in binary)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 5 s, at 10 s, final
    assert lines[-1].startswith("add-index: 10240/10240 (100%) in 10s")


def test_resumed_work_counts_rate_from_the_resume_and_postfix_is_kept():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=10, initial=4, desc="train", unit="step", interval=10.0, stream=out, clock=clock)
    bar.set_postfix(loss="1.234", refresh=False)
    clock.now = 20.0
    bar.update(2)
    bar.close()
    assert out.getvalue().splitlines() == ["train: 6/10 (60%) 0.1 step/s ETA 40s, loss=1.234",
                                           "train: 6/10 (60%) in 20s, 0.1 step/s, loss=1.234"]


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    from tqdm import tqdm

    bar = progress(total=3, desc="x", stream=FakeTTY())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    silent = progress(range(3), desc="x", disable=True, stream=out)
    assert list(silent) == [0, 1, 2]
    silent.update(1)
    silent.close()
    assert out.getvalue() == ""


def test_every_long_loop_uses_the_progress_module():
    """No tqdm(disable=None) left: tqdm is imported only by progress.py."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    users = [p for d in ("src", "stages") for p in (root / d).rglob("*.py")
             if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert users == []
