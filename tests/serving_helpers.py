"""A uvicorn server in a thread on a free loopback port, for the serving tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """`app` served in-process from a thread; `close()` stops it as SIGTERM would (in-flight
    requests finish, then the lifespan shutdown runs)."""

    def __init__(self, app, lifespan: str = "auto", timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan=lifespan)  # fmt: skip
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uv.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def close(self, timeout: float = 60):
        self.uv.should_exit = True
        self.thread.join(timeout)
