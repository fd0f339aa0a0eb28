"""A TCP proxy that resets one connection at a chosen byte: for tests of connections that
break while they open (TCP's handshake, TLS's, a greeting)."""

from __future__ import annotations

import select
import socket
import struct
import threading


class CuttingProxy:
    """A TCP proxy that cuts the first connection through it once the client has sent
    ``cut_after`` bytes: both ends get a RST (``reset``), or a FIN as from a middlebox that
    gives up. Later connections pass untouched. Each connection is pumped both ways by one
    thread, which alone touches its sockets."""

    def __init__(self, target: tuple[str, int], cut_after: int, *, reset: bool = True) -> None:
        self.reset = reset
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.server.getsockname()
        self.target, self.cut_after, self.cut_done = target, cut_after, False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            cut, self.cut_done = not self.cut_done, True
            threading.Thread(target=self._pump, args=(client, upstream, cut),
                             daemon=True).start()

    def _cut(self, *socks: socket.socket) -> None:
        for sock in socks:
            if self.reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def _pump(self, client: socket.socket, upstream: socket.socket, cut: bool) -> None:
        other = {client: upstream, upstream: client}
        reading, from_client = {client, upstream}, 0
        try:
            while reading:
                for sock in select.select(list(reading), [], [])[0]:
                    most = 1 << 16
                    if cut and sock is client:
                        most = self.cut_after - from_client
                        if most <= 0:
                            self._cut(client, upstream)
                            return
                    data = sock.recv(most)
                    if not data:
                        other[sock].shutdown(socket.SHUT_WR)
                        reading.discard(sock)
                        continue
                    other[sock].sendall(data)
                    if sock is client:
                        from_client += len(data)
        except OSError:
            pass
        client.close()
        upstream.close()

    def close(self) -> None:
        self.server.close()
