"""A real MJPEG-over-HTTP camera stream (multipart/x-mixed-replace), stoppable to simulate stream loss."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = "frameboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MjpegServer:
    def __init__(self, port: int | None = None, fps: float = 20.0, size: tuple[int, int] = (160, 120)) -> None:
        self.port = port or free_port()
        self.fps = fps
        self.size = size
        self.frames_sent = 0
        self.freeze = threading.Event()  # keep the connection open but send nothing (a hung stream)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def _jpeg(self, n: int) -> bytes:
        w, h = self.size
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[:, (n * 5) % w] = 255
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        return buf.tobytes()

    def start(self) -> MjpegServer:
        outer = self
        self._stop.clear()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.end_headers()
                n = 0
                try:
                    while not outer._stop.is_set():
                        if outer.freeze.is_set():
                            time.sleep(0.05)
                            continue
                        data = outer._jpeg(n)
                        self.wfile.write(
                            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                            + data
                            + b"\r\n"
                        )
                        self.wfile.flush()
                        outer.frames_sent += 1
                        n += 1
                        time.sleep(1.0 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    return

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Drop the stream: close the listener and every open connection."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        time.sleep(0.2)
