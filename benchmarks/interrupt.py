"""Stopping a bench on SIGINT/SIGTERM without losing what it measured.

The benches write their results as they go (after every row or record). `recording(results, save)` wraps their
loop: inside it SIGINT and SIGTERM raise KeyboardInterrupt, and the `check()` it yields raises one too if such a
signal came while a library swallowed its effect (a signal to the process group also kills a compiler's worker
processes, and the failed compile is caught as an ordinary error). A KeyboardInterrupt leaving the block marks
`results["state"] = "interrupted"`, saves, and propagates: the caller stops and exits 130; a block that ends
normally marks "complete". Results start as "running", so a file left by a SIGKILL says it was cut short.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def recording(results: dict, save: Callable[[], None]) -> Iterator[Callable[[], None]]:
    received: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001 - the signal handler's signature
        received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def check() -> None:
        if received:
            raise KeyboardInterrupt(signal.Signals(received[0]).name)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.signal(s, on_signal) for s in SIGNALS} if main else {}
    results["state"] = "running"
    try:
        yield check
        results["state"] = "complete"
    except KeyboardInterrupt as err:
        results["state"] = "interrupted"
        results["interrupted_by"] = str(err) or "SIGINT"
        raise
    except Exception as err:
        results["state"] = f"failed: {type(err).__name__}: {err}"[:300]
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        save()
