"""quantpipe.logging_utils: progress lines and failure hints."""

from __future__ import annotations

import logging

from quantpipe.logging_utils import Progress, describe_failure, failure_hint


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_logs_counts_rates_eta_and_a_result(caplog):
    clock = Clock()
    log = logging.getLogger("t.progress")
    with caplog.at_level(logging.INFO, logger="t.progress"):
        p = Progress(log, "calibration batches", total=4, every_s=10, clock=clock)
        clock.t += 2
        p.step()  # within every_s: silent
        clock.t += 10
        p.step()
        clock.t += 1
        p.step()
        p.step()  # last one always logs
        p.done("32 samples")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "calibration batches: starting (4 total)"
    assert lines[1].startswith("calibration batches 2/4 (50%) 0.167/s eta 12.0 s")
    assert lines[2].startswith("calibration batches 4/4 (100%)")
    assert lines[3] == "calibration batches: 4 in 13.0 s (0.308/s); 32 samples"


def test_oom_hint_names_concrete_values():
    h = failure_hint(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                     {"calibration_samples": 128, "max_seq_length": 2048})
    assert h.kind == "out_of_memory"
    assert "calibration_samples (e.g. 64)" in h.advice and "max_seq_length (e.g. 1024)" in h.advice
    assert "CPU" in h.advice
    assert failure_hint(MemoryError()).kind == "out_of_memory"


def test_other_hints_and_unknown_errors():
    assert failure_hint(RuntimeError("Cannot access accelerator device when none is available.")).kind == \
        "no_accelerator"
    assert failure_hint(OSError(28, "No space left on device")).kind == "disk_full"
    assert failure_hint(ValueError("something else entirely")) is None
    line = describe_failure(RuntimeError("x" * 1000 + " out of memory"), {})
    # the message is shortened; the hint comes from the full text
    assert len(line) < 600 and line.endswith("a smaller ppl_max_tokens helps in validation")
