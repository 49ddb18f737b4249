"""quantpipe.logs: tqdm bars, loguru messages, library handlers and raw stderr end up as log
records at their real level, not as raw stderr (which Airflow's supervisor records at ERROR).

``quiet_libraries`` changes the whole process (tqdm, loguru, logging, sys.stderr), so each
case runs in a fresh interpreter whose stderr is a pipe read here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from quantpipe.logs import StreamToLog, stderr_level

REPO = Path(__file__).resolve().parents[2]

PRELUDE = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, r):
        records.append({"name": r.name, "level": r.levelname, "msg": r.getMessage(),
                        "exc": r.exc_text or (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")})
root = logging.getLogger()
root.handlers[:] = [Keep()]
root.setLevel(logging.INFO)
def done():
    sys.__stdout__.write("RECORDS " + json.dumps(records) + "\\n")
"""


def _run(body: str, timeout: int = 120) -> tuple[list[dict], str, str]:
    code = PRELUDE + textwrap.dedent(body) + "\ndone()\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "include")})
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("RECORDS "))
    return json.loads(line[len("RECORDS "):]), p.stdout, p.stderr


def _find(records, needle):
    found = [r for r in records if needle in r["msg"]]
    assert found, (needle, records)
    return found


def test_bars_loguru_library_handlers_and_raw_stderr_become_records():
    records, out, err = _run("""
        import time, warnings
        from loguru import logger                      # its default sink writes to stderr
        lib = logging.getLogger("somelib")             # like transformers / torch: own stderr handler
        lib.addHandler(logging.StreamHandler())
        lib.propagate = False
        from quantpipe.logs import quiet_libraries
        quiet_libraries(redirect_stderr=True, bar_min_s=0.05)
        from tqdm import tqdm
        for _ in tqdm(range(40), desc="Tokenizing inputs"):
            time.sleep(0.003)
        for _ in tqdm(range(5), desc="Dispatching model"):   # too short to be worth a line
            pass
        logger.info("Compression lifecycle initialized")
        logger.warning("No accelerator available! Compressing model on CPU instead")
        logger.log("METRIC", "error 0.40") if "METRIC" in logger._core.levels else None
        lib.warning("`run_compressed` is deprecated")
        print("W1201 05:31:14.050000 1 torch/fx/_symbolic_trace.py:56] is_fx_tracing will return true",
              file=sys.stderr)
        print("a plain notice", file=sys.stderr)
        warnings.warn("a python warning")
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("task").exception("stage failed")
        try:
            {}["missing"]
        except KeyError:
            logger.exception("loguru saw an error")
        import traceback
        try:
            raise RuntimeError("printed traceback")
        except RuntimeError:
            traceback.print_exc()
    """)
    assert err == "", err  # nothing reached the raw stream
    assert "Compression lifecycle" not in out.split("RECORDS ", 1)[0]
    bar = _find(records, "Tokenizing inputs")
    assert len(bar) == 1 and bar[0]["level"] == "INFO" and bar[0]["name"] == "quantpipe.progress"
    assert "40/40 in" in bar[0]["msg"] and "/s)" in bar[0]["msg"]
    assert not [r for r in records if "Dispatching model" in r["msg"]]
    assert _find(records, "Compression lifecycle initialized")[0]["level"] == "INFO"
    assert _find(records, "No accelerator available")[0]["level"] == "WARNING"
    assert _find(records, "`run_compressed` is deprecated") == [
        {"name": "somelib", "level": "WARNING", "msg": "`run_compressed` is deprecated", "exc": ""}]
    torch_line = _find(records, "is_fx_tracing")[0]
    assert (torch_line["name"], torch_line["level"]) == ("stderr", "WARNING")
    assert _find(records, "a plain notice")[0]["level"] == "WARNING"
    assert _find(records, "a python warning")[0]["level"] == "WARNING"
    # errors stay errors, with their traceback
    failed = _find(records, "stage failed")[0]
    assert failed["level"] == "ERROR" and "ZeroDivisionError" in failed["exc"]
    lg = _find(records, "loguru saw an error")[0]
    assert lg["level"] == "ERROR" and "KeyError" in lg["exc"]
    printed = _find(records, "printed traceback")[0]
    assert printed["level"] == "ERROR" and printed["msg"].startswith("Traceback (most recent call last)")
    assert not [r for r in records if r["level"] == "ERROR"
                and not any(k in r["msg"] for k in ("stage failed", "loguru saw", "printed traceback"))]


def test_libraries_imported_later_are_routed_too():
    """transformers and llm-compressor imported after the call (as the stages do): transformers'
    stderr handler and llm-compressor's stdout loguru sink are replaced right after their import."""
    records, out, err = _run("""
        from quantpipe.logs import quiet_libraries
        quiet_libraries(redirect_stderr=False)         # the raw stream stays: only the routing is tested
        from transformers.utils import logging as tl
        tl.get_logger("transformers.tokenization_utils_tokenizers").warning("Ignoring clean_up_tokenization_spaces")
        import llmcompressor
        from llmcompressor import logger
        logger.info("Compression lifecycle reset")
        logger.log("METRIC", "time 0.15s")
        logger.warning("No accelerator available!")
    """, timeout=300)
    assert err == "", err
    assert "Compression lifecycle reset" not in out.split("RECORDS ", 1)[0]
    tf = _find(records, "clean_up_tokenization_spaces")
    assert len(tf) == 1 and tf[0]["level"] == "WARNING"
    assert _find(records, "Compression lifecycle reset")[0]["level"] == "INFO"
    assert _find(records, "No accelerator available!")[0]["level"] == "WARNING"
    assert not [r for r in records if "time 0.15s" in r["msg"]]  # METRIC lines are DEBUG


def test_stderr_levels():
    assert stderr_level("W1201 05:31:14.05 1 torch/fx/x.py:56] note") == logging.WARNING
    assert stderr_level("E1201 05:31:14.05 1 x.cc:1] broken") == logging.ERROR
    assert stderr_level("INFO: loading") == logging.INFO
    assert stderr_level("ValueError: bad") == logging.ERROR
    assert stderr_level("CUDA error: out of memory") == logging.ERROR
    assert stderr_level("[transformers] `run_compressed` is deprecated") == logging.WARNING


def test_stream_to_log_keeps_lines_whole():
    log = logging.getLogger("test_logs.stream")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append((r.levelname, r.getMessage()))
    log.addHandler(handler)
    log.propagate = False
    s = StreamToLog(log)
    s.write("half a ")
    s.flush()  # writers flush between pieces of a line
    s.write("line\n\rbar 10%\rbar 100%\n")
    s.write("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'k'\n")
    assert seen == [("WARNING", "half a line"), ("WARNING", "bar 100%"),
                    ("ERROR", "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'k'")]
