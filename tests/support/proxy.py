"""A TCP proxy that can make its connections go silent: a peer gone without a reset.

A SIGKILLed server resets its connections; a host that dies, a network partition or a frozen
server does not: the client's socket stays open and nothing ever comes back.
:meth:`SilentProxy.silence` does that to every connection open at that moment (they stay
open, nothing is forwarded either way); connections made afterwards work normally.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

__all__ = ["SilentProxy"]


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.silent = threading.Event()


class SilentProxy:
    """Forwards 127.0.0.1:<port> to ``target``; a context manager that closes everything."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def silence(self) -> int:
        """Every open connection goes silent for good; returns how many."""
        with self._lock:
            for pair in self._pairs:
                pair.silent.set()
            return len(self._pairs)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        ends = {pair.client: pair.upstream, pair.upstream: pair.client}
        while not self._closed.is_set():
            if pair.silent.is_set():
                self._closed.wait(0.2)  # keep both sockets open, forward nothing
                continue
            try:
                readable, _, _ = select.select(list(ends), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    ends[sock].sendall(data)
            except OSError:
                break
        for sock in ends:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> SilentProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
