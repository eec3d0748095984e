"""pipeline/progress.py: a few plain lines in a log, nothing when quiet."""

import io

from pipeline.progress import progress


def test_progress_in_a_log_is_a_few_plain_lines():
    log = io.StringIO()  # not a terminal
    clock = [0.0]
    bar = progress(100, "verify", file=log)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(100):
        clock[0] += 1.0  # 100 s of work, one clip a second
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("verify:   0% 0/100") and lines[-1].startswith("verify: 100% 100/100")
    assert len(lines) == 11, lines  # the start, then every 10 %
    assert "1.00clip/s" in lines[5] and "<00:50" in lines[5], "rate and ETA"


def test_progress_quiet_prints_nothing():
    log = io.StringIO()
    with progress(10, "verify", quiet=True, file=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""
