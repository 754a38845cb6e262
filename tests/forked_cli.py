"""A console script's entry point (thawlab-train's, thawlab-soup's) in a process of its own, forked from a server that imported thawlab, torch, timm and
Lightning once (multiprocessing's forkserver), for conftest.cli and test_soup's cli.

The child has its own pid, exit status, stdout and stderr (files, as a pipe: not a terminal), environment and
working directory, and runs what the console script runs, `sys.exit(main())` with sys.argv, then what an
ending interpreter runs (threading's exit hooks, the atexit handlers). What it skips is the five to eight seconds
of CPU in which every new interpreter imports those libraries: `make test` starts thawlab-train about a hundred
times. What it cannot show is an interpreter's start itself (environment read at import time, the console
script): conftest.cli starts a new interpreter for those (`fresh=True`, or an `env` outside RUN_TIME_ENV).
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# imported once by the server; the server does no torch work, so forking it is safe
PRELOAD = ["torch", "lightning", "timm", "thawlab.train", "thawlab.build", "thawlab.module", "thawlab.pretrain",
           "thawlab.soup"]

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(entry: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):  # as a shell's redirection: the process's own fds 1 and 2
        target = os.open(path, os.O_WRONLY)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv)
    code = 0
    try:
        module, name = entry.split(":")
        raise SystemExit(getattr(importlib.import_module(module), name)())  # what the console script runs
    except SystemExit as e:  # as the interpreter turns sys.exit(x) into a status
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (an uncaught exception: its traceback and status 1, as the interpreter)
        traceback.print_exc()
        code = 1
    # what an ending interpreter does before its exit status, which os._exit below would skip: threading's exit
    # hooks (executors shut down their workers, e.g. joblib's) and joins the other threads, then the atexit
    # handlers (W&B, logging, multiprocessing joining its children)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str], cwd: Path, env: dict, timeout: float, entry: str = "thawlab.train:main"
        ) -> subprocess.CompletedProcess:
    """As subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), argv[0] being
    the console script whose entry point (pyproject's [project.scripts]) is `entry`."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        p = _forkserver().Process(target=_child, args=(entry, list(argv), str(cwd), dict(env), str(out), str(err)))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(argv, p.exitcode, out.read_text(), err.read_text())
