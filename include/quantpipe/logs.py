"""Task logs a person reads: library notices at their real level, progress as a few INFO lines.

Airflow 3's task supervisor connects the task process's fd 1 and fd 2 to sockets and records
every line read from them as a log event of its own: ``task.stdout`` at INFO and
``task.stderr`` at **ERROR** (``airflow.sdk.execution_time.supervisor``,
``_register_pipe_readers``). Only records that go through Python ``logging`` (or structlog)
reach the task log at their real level. The libraries this pipeline runs write to the raw
streams: tqdm bars (lm-eval, compressed-tensors, transformers, datasets, huggingface_hub)
and the stderr handlers that transformers, torch, datasets and huggingface_hub attach to
their own loggers land on stderr, so a green task shows red ERROR lines; llm-compressor
logs through loguru to stdout (its warnings become INFO).

``quiet_libraries()``, called first thing in every task (idempotent, process-wide):

- progress bars: huggingface_hub, datasets and transformers bars off (their env switches
  and disable functions); every other tqdm bar (lm-eval's "Running loglikelihood requests",
  compressed-tensors' "Dispatching model", llm-compressor's calibration loops) draws nothing
  and, when it ran for ``bar_min_s`` seconds or more, logs one INFO line with its count and
  rate when it ends ("Running loglikelihood requests: 900/900 in 12.3 s (73.2/s)") and one
  every ``bar_every_s`` seconds while it runs. ``TQDM_DISABLE=1`` is set for child
  processes;
- Python ``warnings`` -> logger ``py.warnings`` at WARNING (unless Airflow already does it);
- library loggers: their own console handlers removed, records propagated to the root logger
  (which Airflow sends to the task log at their level); noisy libraries at WARNING;
- loguru (llm-compressor, compressed-tensors): its console sinks replaced by one sink that
  forwards each message to the Python logger of its module at the same level (llm-compressor's
  per-module ``METRIC`` lines at DEBUG), exceptions with their traceback;
- whatever is still written to ``sys.stderr`` in a supervised task (a handler a library
  creates later, a ``print(..., file=sys.stderr)``) goes to the logger ``stderr``, at ERROR
  for a traceback or a line that says error, else at the level the line names (glog's
  W/I/E prefixes, "WARNING", "INFO"), else WARNING.

Libraries imported after the call (torch, transformers, lm-eval, llm-compressor are
imported inside the stages) are fixed up right after their import by an import hook.
Errors stay errors: an exception in the task is logged by Airflow as ERROR with its
traceback; a library's ERROR record stays ERROR. Writes below Python (C/C++ code writing
to fd 2 directly) still reach the supervisor's stderr socket.

No Airflow imports; pure Python.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import re
import stat
import sys
import threading
import time
import warnings

log = logging.getLogger(__name__)
progress_log = logging.getLogger("quantpipe.progress")
stderr_log = logging.getLogger("stderr")

ENV = {
    "TQDM_DISABLE": "1",  # child processes (vLLM, sandboxes); this process converts bars instead
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# library loggers and the level a task log shows them at
LEVELS = {
    "transformers": logging.WARNING, "datasets": logging.WARNING, "huggingface_hub": logging.WARNING,
    "accelerate": logging.WARNING, "filelock": logging.WARNING, "fsspec": logging.WARNING,
    "urllib3": logging.WARNING, "torch": logging.WARNING, "dill": logging.WARNING,
    "lm_eval": logging.INFO, "llmcompressor": logging.INFO, "compressed_tensors": logging.INFO,
}
# loggers whose handlers are Airflow's (or the caller's) own business
KEEP_HANDLERS = ("airflow", "quantpipe", "py.warnings")
# after these modules are imported, their loggers, bars and loguru sinks are fixed up
WATCHED = frozenset({"torch", "transformers", "datasets", "huggingface_hub", "accelerate", "lm_eval",
                     "compressed_tensors", "llmcompressor", "llmcompressor.logger", "dill", "evaluate"})

BAR_MIN_S = 2.0
BAR_EVERY_S = 30.0

_lock = threading.RLock()
_state: dict = {"done": False, "bar_min_s": BAR_MIN_S, "bar_every_s": BAR_EVERY_S, "loguru_sink": None}


def quiet_libraries(*, redirect_stderr: bool | None = None, bar_min_s: float | None = None,
                    bar_every_s: float | None = None) -> None:
    """Route library output of this process into Python logging (see the module docstring).

    ``redirect_stderr``: send ``sys.stderr`` writes to the ``stderr`` logger; by default only
    when fd 2 is a socket (the Airflow supervisor's), never in a test or terminal session.
    Safe to call again (later calls only update the bar thresholds and redo the sweep)."""
    with _lock:
        if bar_min_s is not None:
            _state["bar_min_s"] = float(bar_min_s)
        if bar_every_s is not None:
            _state["bar_every_s"] = float(bar_every_s)
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        _patch_tqdm()
        _capture_warnings()
        _install_import_hook()
        for name in WATCHED:
            if name in sys.modules:
                _after_import(name)
        _route_loguru()
        _route_loggers()
        if redirect_stderr is None:
            redirect_stderr = _stderr_is_supervised()
        if redirect_stderr and not isinstance(sys.stderr, StreamToLog):
            sys.stderr = StreamToLog(stderr_log, sys.stderr)
        _state["done"] = True


def quiet_task(context=None) -> None:
    """``quiet_libraries`` with the signature of an Airflow task callback (``on_execute_callback``)."""
    quiet_libraries()


# ---------------------------------------------------------------------------------------------
# tqdm


def _patch_tqdm() -> None:
    try:
        from tqdm import std
    except ImportError:
        return
    cls = std.tqdm
    if getattr(cls, "_quantpipe_patched", False):
        return
    orig_init, orig_close = cls.__init__, cls.close

    def __init__(self, *args, **kwargs):
        wanted = not kwargs.get("disable") and len(args) < 11  # disable is the 11th positional
        if wanted:
            kwargs["disable"] = False  # TQDM_DISABLE=1 would drop the count; it is logged instead
            kwargs["file"] = _DISCARD
            kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.1), 1.0)
        self._qp_log = False
        orig_init(self, *args, **kwargs)
        self._qp_log = wanted and not self.disable
        self._qp_last = time.monotonic()

    def display(self, msg=None, pos=None):  # never draws; now and then a log line
        if getattr(self, "_qp_log", False) and getattr(self, "n", 0):
            now = time.monotonic()
            elapsed = self._time() - self.start_t
            if now - self._qp_last >= _state["bar_every_s"] and elapsed >= _state["bar_min_s"] and \
                    (self.total is None or self.n < self.total):
                self._qp_last = now
                progress_log.info("%s", _bar_line(self, elapsed, done=False))
        return True

    def close(self):
        if getattr(self, "_qp_log", False) and not self.disable:
            self._qp_log = False
            elapsed = self._time() - self.start_t
            if self.n and elapsed >= _state["bar_min_s"]:
                progress_log.info("%s", _bar_line(self, elapsed, done=True))
        return orig_close(self)

    cls.__init__, cls.display, cls.close = __init__, display, close
    cls._quantpipe_patched = True


def _bar_line(bar, elapsed: float, done: bool) -> str:
    what = (bar.desc or "progress").rstrip(": ")
    count = f"{bar.n:g}" + (f"/{bar.total:g}" if bar.total else "")
    rate = bar.n / elapsed if elapsed > 0 else 0.0
    unit = "" if bar.unit in ("it", "") else f" {bar.unit}"
    line = f"{what}: {count}{unit} in {elapsed:.1f} s ({rate:.3g}/s)"
    if not done and bar.total and rate > 0:
        line += f", eta {(bar.total - bar.n) / rate:.0f} s"
    return line


class _Discard:
    def write(self, s) -> int:
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


_DISCARD = _Discard()


def _disable_hf_bars(name: str) -> None:
    try:
        if name == "huggingface_hub":
            from huggingface_hub.utils import disable_progress_bars
            disable_progress_bars()
        elif name == "datasets":
            from datasets.utils import disable_progress_bars as ds_disable
            ds_disable()
        elif name == "transformers":
            from transformers.utils import logging as tf_logging
            tf_logging.disable_progress_bar()
            tf_logging.disable_default_handler()
            tf_logging.enable_propagation()
    except Exception as e:  # a library version without these switches
        log.debug("could not quiet %s: %s", name, e)


# ---------------------------------------------------------------------------------------------
# warnings and library loggers


def _capture_warnings() -> None:
    # Airflow installs its own showwarning (records at WARNING under py.warnings); keep it
    if getattr(warnings.showwarning, "__module__", None) == "warnings":
        logging.captureWarnings(True)


def _console(stream) -> bool:
    if stream is None:
        return False
    if isinstance(stream, StreamToLog) or stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
        return True
    try:
        return stream.fileno() in (1, 2)
    except Exception:
        return False


def _route_loggers() -> None:
    """Console handlers of library loggers removed; their records propagate to the root logger."""
    loggers = [lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        if lg.name.split(".")[0] in KEEP_HANDLERS:
            continue
        console = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                   and not isinstance(h, logging.FileHandler) and _console(getattr(h, "stream", None))]
        for h in console:
            lg.removeHandler(h)
        if console and not lg.propagate:
            lg.propagate = True
    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------------------------------
# loguru


_LOGURU_LEVELS = {"TRACE": 5, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "SUCCESS": logging.INFO,
                  "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
                  "METRIC": logging.DEBUG}  # llm-compressor: per-module GPTQ time and error
_logged_once: set[str] = set()


def _loguru_sink(message) -> None:
    r = message.record
    level = _LOGURU_LEVELS.get(r["level"].name)
    if level is None:
        no = r["level"].no
        level = max(lv for lv in (5, 10, 20, 30, 40, 50) if lv <= no) if no >= 5 else 5
    lg = logging.getLogger(r["name"] or "loguru")
    if not lg.isEnabledFor(level):
        return
    exc = r["exception"]
    exc_info = (exc.type, exc.value, exc.traceback) if exc else None
    rec = lg.makeRecord(lg.name, level, r["file"].path, r["line"], r["message"], None, exc_info,
                        func=r["function"])
    lg.handle(rec)


def _once(record) -> bool:
    # llm-compressor's ``logger.bind(log_once=True)``
    if not record["extra"].get("log_once"):
        return True
    key = record["level"].name + record["message"]
    if key in _logged_once:
        return False
    _logged_once.add(key)
    return True


def _route_loguru() -> None:
    """loguru's sinks (its default stderr one, llm-compressor's stdout one) replaced by one that
    forwards to Python logging."""
    if "loguru" not in sys.modules:
        try:
            import loguru  # noqa: F401  (cheap; compressed-tensors and llm-compressor use it)
        except ImportError:
            return
    from loguru import logger

    handlers = getattr(getattr(logger, "_core", None), "handlers", None)
    ours = _state["loguru_sink"]
    if handlers is None:  # a loguru without the internals read below: start from no sinks
        logger.remove()
        ours = None
    else:
        for hid, h in list(handlers.items()):
            if hid != ours and _console(getattr(getattr(h, "_sink", None), "_stream", None)):
                logger.remove(hid)  # console sinks only; a configured log file stays
    if ours is None or handlers is None or ours not in handlers:
        _state["loguru_sink"] = logger.add(_loguru_sink, level="DEBUG", format="{message}", filter=_once,
                                           backtrace=False, diagnose=False, catch=True)


# ---------------------------------------------------------------------------------------------
# libraries imported later


def _after_import(name: str) -> None:
    try:
        if name in ("huggingface_hub", "datasets", "transformers"):
            _disable_hf_bars(name)
        if name.startswith(("llmcompressor", "compressed_tensors")):
            _route_loguru()
        _route_loggers()
    except Exception as e:  # never break the import that triggered this
        log.debug("quieting %s failed: %s", name, e)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Runs ``_after_import`` once a watched module has executed (its handlers are in place)."""

    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.name = None
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        orig = loader.exec_module

        def exec_module(module):
            orig(module)
            _after_import(fullname)

        try:
            loader.exec_module = exec_module  # this module's own loader instance
        except (AttributeError, TypeError):
            pass
        return spec


def _install_import_hook() -> None:
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


# ---------------------------------------------------------------------------------------------
# raw stderr


def _stderr_is_supervised() -> bool:
    """fd 2 is a socket: the Airflow supervisor's, which records each line at ERROR."""
    try:
        return stat.S_ISSOCK(os.fstat(2).st_mode)
    except OSError:
        return False


_GLOG = re.compile(r"^\[?([IWEF])\d{4} ")
_NAMED = re.compile(r"^\W*(?:\S+\s+)?\b(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\b", re.I)
_ERRORISH = re.compile(r"^(Traceback \(most recent call last\)|\S*(Error|Exception)\b:?)|\berror\b", re.I)


def stderr_level(line: str) -> int:
    """The level a raw stderr line reads at."""
    m = _GLOG.match(line)
    if m:
        return {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}[m[1]]
    m = _NAMED.match(line)
    if m:
        name = m[1].upper()
        return {"WARN": logging.WARNING, "FATAL": logging.CRITICAL}.get(name, getattr(logging, name))
    if _ERRORISH.search(line):
        return logging.ERROR
    return logging.WARNING


class StreamToLog:
    """A text stream that logs each complete line (a traceback as one ERROR record); bar
    redraws (``\\r``) keep only their last state."""

    def __init__(self, logger: logging.Logger, original=None):
        self.logger, self.original = logger, original
        self._buf = ""
        self._tb: list[str] | None = None
        self._lock = threading.RLock()
        self._inside = threading.local()
        self.encoding = getattr(original, "encoding", "utf-8") or "utf-8"
        self.errors = "replace"

    def write(self, s) -> int:
        if isinstance(s, bytes):
            s = s.decode(self.encoding, "replace")
        if getattr(self._inside, "on", False):  # logging itself wrote here (handleError): no loop
            if self.original is not None:
                self.original.write(s)
            return len(s)
        self._inside.on = True
        try:
            return self._write(s)
        finally:
            self._inside.on = False

    def _write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._line(line.rsplit("\r", 1)[-1].rstrip())
        return len(s)

    def _line(self, line: str) -> None:
        if self._tb is not None:
            self._tb.append(line)
            if line and not line[0].isspace():  # the exception line ends a traceback
                self.logger.error("%s", "\n".join(self._tb))
                self._tb = None
            return
        if line.startswith("Traceback (most recent call last)"):
            self._tb = [line]
            return
        if line.strip():
            self.logger.log(stderr_level(line), "%s", line)

    def flush(self) -> None:
        """Nothing: a partial line waits for its end (writers flush between pieces of a line)."""

    def drain(self) -> None:
        """Log what is buffered: a partial line, an unfinished traceback."""
        with self._lock:
            if self._tb:
                self.logger.error("%s", "\n".join(self._tb))
                self._tb = None
            if self._buf.strip():
                line, self._buf = self._buf, ""
                self._line(line.rsplit("\r", 1)[-1].rstrip())
            self._buf = ""

    def writelines(self, lines) -> None:
        for s in lines:
            self.write(s)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self.original is None:
            raise OSError("no file descriptor")
        return self.original.fileno()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.drain()

    @property
    def closed(self) -> bool:
        return False

    @property
    def buffer(self):
        return getattr(self.original, "buffer", None)
