"""Fault injection on real traffic: a TCP proxy between the workers and the S3 server.

The proxy forwards bytes unchanged. It can be taken down (new and open connections are
refused/closed, as when an endpoint is unreachable) and can slow the upload of matching
requests (to kill a worker while a checkpoint is mid-upload).
"""

from __future__ import annotations

import socket
import threading
import time

_REQUEST_STARTS = (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE")


class FaultyProxy:
    """A loopback TCP proxy to ``target`` (``host:port``) whose faults a test switches on and off.

    Attributes:
        upload_in_flight: set while a slowed request is being forwarded.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.slow_marker: bytes | None = None  # requests whose head contains this are slowed
        self.slow_delay_s = 0.05  # per 16 KiB chunk
        self.upload_in_flight = threading.Event()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: use as S3_ENDPOINT_URL."""
        return f"http://127.0.0.1:{self.port}"

    def go_down(self) -> None:
        """Refuse new connections and cut open ones."""
        self.down.set()
        with self._lock:
            for sock in self._connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def come_back(self) -> None:
        """Forward again."""
        self.down.clear()

    def close(self) -> None:
        """Stop accepting and cut everything."""
        self._closed = True
        self.go_down()
        self.server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        slowed = False
        try:
            while True:
                data = source.recv(16384)
                if not data or self.down.is_set():
                    break
                if from_client and data[:4] in _REQUEST_STARTS:  # a new request on this connection
                    slowed = self.slow_marker is not None and self.slow_marker in data[:2048]
                if slowed:
                    self.upload_in_flight.set()
                    time.sleep(self.slow_delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if slowed:
                self.upload_in_flight.clear()
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
