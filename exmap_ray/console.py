"""What a person reads while a job runs: log lines that name their stage or row, progress of the long
stages, and Ray's own lines kept off the console unless asked for.

    07:04:16 [erm] epoch 2/5: loss 0.0470, train acc 0.990, val acc 0.990, 43 img/s
    07:10:54 [heatmaps] shard 2/3: 2048/3000 images, 85 img/s
    07:11:06 [retrain: ExMap] DFR: C=0.7 (held-out worst-group acc 0.628), 4 groups {...}
    07:11:07 [retrain: oracle] DFR: C=0.7 (held-out worst-group acc 0.628), 4 groups {...}
    06:38:11 [trials] trial 2/2 done: run_trial_b2ef3_00000 (clustering.k=2), selection metric 0.250;
             best so far 0.250 (run_trial_b2ef3_00001)

Levels (`configure`, from the CLI): QUIET (warnings and the final table), NORMAL (also our INFO lines
and the progress; other packages' INFO lines stay off), VERBOSE (also Ray's lines: its workers'
output, Ray Train's per-report lines, Tune's tables; every package's INFO lines; logger names).
Progress is a tqdm bar on stderr when stderr is a terminal, else one plain log line per step, so
`--quiet` drops it as any INFO line. Progress is printed by the
driver: ERM's epochs come from rank 0 through a small mailbox actor (`Mailbox`), the heatmap
shards and the sweep's trials are counted where the driver already waits for them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from typing import Callable

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level: int | None = None  # set by configure() in a CLI process; None in a library caller or a Ray worker
_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar("exmap_ray_console_tag", default=None)
log = logging.getLogger("exmap_ray.console")
# Ray's notice that a new local Ray enabled token auth by default: not a problem of the run. Its
# counterpart, "Token authentication is disabled ...", is a real warning and stays.
RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def level() -> int | None:
    return _level


def verbose() -> bool:
    return _level == VERBOSE


@contextlib.contextmanager
def tagged(tag: str):
    """Log lines inside name `tag` (a stage, a row): "[erm] ...", "[retrain: oracle] ..."."""
    token = _tag.set(tag)
    try:
        yield
    finally:
        _tag.reset(token)


def _record_factory(base):
    def make(*args, **kwargs):
        record = base(*args, **kwargs)
        record.exmap_ray_tag = _tag.get()  # when the line is logged, not when (or in which thread) it is written
        return record

    make.exmap_ray = True
    return make


if not getattr(logging.getLogRecordFactory(), "exmap_ray", False):
    logging.setLogRecordFactory(_record_factory(logging.getLogRecordFactory()))


class Formatter(logging.Formatter):
    """HH:MM:SS [LEVEL] [tag] message. The logger's name only where it says more than the tag: another
    package's lines, and every line under VERBOSE."""

    def __init__(self, names: bool = False):
        super().__init__(datefmt="%H:%M:%S")
        self.names = names

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None) or getattr(record, "exmap_ray_tag", None)
        parts = [self.formatTime(record, self.datefmt)]
        if record.levelno >= logging.WARNING:
            parts.append(record.levelname)
        if self.names or not record.name.startswith("exmap_ray"):
            parts.append(record.name + ":")
        if tag:
            parts.append(f"[{tag}]")
        line = " ".join(parts) + " " + record.getMessage()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when it writes (pytest swaps it between tests)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_AUTH_NOTICE)


def configure(lvl: int) -> None:
    """The console of a CLI process: the root handler's format and level, the noisy loggers' levels,
    and the settings Ray reads from the environment (set before Ray starts, which the CLI does later)."""
    global _level
    _level = lvl
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    handler = _Stderr()
    handler.setFormatter(Formatter(names=lvl == VERBOSE))
    root = logging.getLogger()
    for h in list(root.handlers):  # a second configure (tests call main() many times) replaces, not adds
        if isinstance(h.formatter, Formatter):
            root.removeHandler(h)
    root.addHandler(handler)
    # INFO lines: ours by default (exmap_ray.*), every package's under -v; warnings from all at every level
    root.setLevel(logging.INFO if lvl == VERBOSE else logging.WARNING)
    logging.getLogger("exmap_ray").setLevel(logging.INFO if lvl == NORMAL else logging.NOTSET)
    for noisy in ("alembic", "mlflow", "filelock", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    notice = logging.getLogger(RAY_AUTH_LOGGER)
    for f in [f for f in notice.filters if isinstance(f, _DropNotice)]:
        notice.removeFilter(f)
    if lvl != VERBOSE:
        notice.addFilter(_DropNotice())
    if not sys.stdout.isatty():  # else Ray colours a worker line's "(RayTrainWorker pid=...)", in a file too
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _bar() -> bool:
    return _level is not None and _level >= NORMAL and sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")


class Progress:
    """One long stage's progress: `step(n, line, postfix)` after each unit of it (an epoch, a shard, a
    trial). A tqdm bar (`postfix` beside it) when stderr is a terminal, else `line` logged at INFO."""

    def __init__(self, tag: str, total: int, unit: str, initial: int = 0):
        self.tag, self.bar, self._redirect = tag, None, None
        if _bar():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=f"[{tag}]", unit=unit, file=sys.stderr, dynamic_ncols=True
            )
            self._redirect = logging_redirect_tqdm()  # log lines meanwhile go above the bar, not through it
            self._redirect.__enter__()

    @property
    def shown(self) -> bool:
        """Whether a step reaches the console at all (not under --quiet): else nobody need collect them."""
        return self.bar is not None or log.isEnabledFor(logging.INFO)

    def step(self, n: int, line: str, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
        else:
            log.info(line, extra={"tag": self.tag})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Mailbox:
    """Where Ray workers leave progress for the driver (an actor, no CPU); `take` empties it."""

    def __init__(self):
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def post(mailbox, item) -> None:
    """In a worker: leave `item` for the driver, without waiting; a lost mailbox loses progress only."""
    if mailbox is None:
        return
    try:
        mailbox.put.remote(item)
    except Exception:  # noqa: BLE001 - progress never stops the work
        pass


@contextlib.contextmanager
def mailbox(on_item: Callable[[dict], None], wanted: bool = True, every_s: float = 0.5):
    """A Mailbox actor for the workers (yielded; None when not `wanted`), emptied by a thread here that
    hands each item to `on_item` while the block runs, and once more after it."""
    if not wanted:
        yield None
        return
    import ray

    # "DEFAULT": outside any placement group the caller runs in; no CPU, so it never waits for one
    box = ray.remote(Mailbox).options(num_cpus=0, scheduling_strategy="DEFAULT").remote()
    stop = threading.Event()

    def drain() -> None:
        try:
            for item in ray.get(box.take.remote()):
                on_item(item)
        except Exception as e:  # noqa: BLE001 - the progress is lost, not the work
            log.debug("progress mailbox: %s", e)

    def loop() -> None:
        while not stop.wait(every_s):
            drain()

    thread = threading.Thread(target=loop, name="exmap-ray-progress", daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        drain()
        ray.kill(box)
