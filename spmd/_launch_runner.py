"""How ``spmd-launch`` runs each rank: ``python .../_launch_runner.py LAUNCHER_PID (-m MODULE | SCRIPT) [ARGS...]``.

The runner stands in for ``python SCRIPT ARGS...`` (or ``python -m MODULE ARGS...``): the script
sees the same ``sys.argv``, ``sys.path[0]`` and ``__name__ == "__main__"``, and the runner adds
three things that only make sense under a launcher:

* an uncaught exception prints its traceback (through ``sys.excepthook``), flushes stdout and
  stderr, and ends the process at once with exit code 1 (130 for ``KeyboardInterrupt``);
* ``sys.exit(n)`` with ``n != 0`` (or a message) flushes and ends the process at once with that
  code. Neither waits at JAX's shutdown barrier, where a failed rank would otherwise sit for
  minutes waiting for peers that are waiting for it. A clean exit (``sys.exit(0)``, ``None``, or
  the end of the script) exits normally, so JAX's orderly shutdown runs;
* the rank dies with the launcher: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (then a check
  that the launcher did not already die before that call), elsewhere a watchdog thread that
  polls ``os.getppid()``.

The process-wide hooks live here, in the rank's own entry point, and nowhere in the library: a
process that ``spmd-launch`` did not start keeps Python's default behaviour.

This module imports only the standard library and is run by path rather than with ``-m
spmd._launch_runner``, so that neither JAX nor ``spmd`` is imported before the script runs.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["PARENT_DEATH_SIGNAL", "exit_code_of", "main"]

PARENT_DEATH_SIGNAL = signal.SIGKILL  # JAX catches SIGTERM (a preemption notice), so nothing milder
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCHDOG_PERIOD_S = 0.5
_USAGE = "usage: _launch_runner.py LAUNCHER_PID (-m MODULE | SCRIPT) [ARGS...]"


def exit_code_of(exc: SystemExit) -> int:
    """The process exit code Python gives ``raise exc``: ``None`` -> 0, an int as is, else 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return 1


def _die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the launcher) dies, however it dies (SIGKILL too)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
        if ok:
            # The launcher may have died between our fork and the prctl call: the signal would
            # then never come, and we would already be someone else's child.
            if os.getppid() != parent_pid:
                os._exit(128 + int(PARENT_DEATH_SIGNAL))
            return
    _start_watchdog(parent_pid)


def _start_watchdog(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_PERIOD_S)
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)

    threading.Thread(target=watch, name="spmd-launch-watchdog", daemon=True).start()


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # a closed or broken stream must not stop the exit
            pass
    if "logging" in sys.modules:
        try:
            sys.modules["logging"].shutdown()
        except Exception:
            pass


def user_traceback(tb, *callers: str):
    """``tb`` without the leading frames of the runner, runpy and ``callers`` (file names): the user's code.

    As ``python script.py`` would print it.
    """
    own = {user_traceback.__code__.co_filename, runpy.run_path.__code__.co_filename, *callers}  # "<frozen runpy>"
    while tb is not None and tb.tb_frame.f_code.co_filename in own:
        tb = tb.tb_next
    return tb


def _set_sys_path(module: bool, target: str) -> None:
    """Make ``sys.path[0]`` what ``python SCRIPT`` / ``python -m MODULE`` would have made it."""
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == here:
        del sys.path[0]  # this runner's own directory (spmd/), which the script must not see
    if sys.flags.safe_path:  # python -P / PYTHONSAFEPATH: nothing is prepended
        return
    if module:
        sys.path.insert(0, os.getcwd())
    elif os.path.isfile(target):
        sys.path.insert(0, os.path.dirname(os.path.realpath(target)))
    # a directory or zip file with __main__.py: runpy.run_path puts it on sys.path itself


def run_target(target: str, script_args: Sequence[str] = (), *, module: bool = False) -> None:
    """Run a script (or ``-m`` module) in this process as ``python SCRIPT ARGS...`` would.

    ``__name__ == "__main__"``, the same ``sys.argv``, and the script's directory (the working
    directory for ``-m``) as ``sys.path[0]``. Exceptions propagate.
    """
    _set_sys_path(module, target)
    sys.argv = [target, *script_args]  # runpy replaces argv[0] with the file it runs
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the rank's script or module; see the module docstring. Does not return on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    module = len(args) >= 3 and args[1] == "-m"
    if len(args) < 2 or (args[1] == "-m" and not module) or not args[0].isdigit():
        print(_USAGE, file=sys.stderr, flush=True)
        os._exit(2)
    parent_pid, rest = int(args[0]), args[2:] if module else args[1:]
    target, script_args = rest[0], rest[1:]
    _die_with_parent(parent_pid)
    try:
        run_target(target, script_args, module=module)
    except SystemExit as e:
        code = exit_code_of(e)
        if code == 0:
            raise  # a clean exit: let the interpreter (and JAX's atexit shutdown) finish normally
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what Python prints for sys.exit("message")
        flush()
        os._exit(code)
    except BaseException as e:
        tb = user_traceback(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)  # the default hook prints e.__traceback__
        flush()
        os._exit(128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()
