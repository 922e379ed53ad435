"""A sandbox's web app for the preview-port tests (Python standard library only):
HTTP on 8000 (files from /srv, POST bodies hashed back, a slow stream, a cookie, the
headers it was sent) and a WebSocket echo server on 8765."""
import base64
import hashlib
import http.server
import os
import socket
import struct
import threading
import time

os.makedirs("/srv", exist_ok=True)


class App(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *a, **kw):
        super().__init__(*a, directory="/srv", **kw)

    def log_message(self, *a):
        pass

    def body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    def reply(self, status, data, extra=()):
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        data = self.body()
        self.reply(200, f"{len(data)} {hashlib.sha256(data).hexdigest()} {self.path}".encode())

    def do_GET(self):
        if self.path == "/headers":
            return self.reply(200, str(self.headers).encode())
        if self.path == "/cookie":
            return self.reply(200, b"c", [("set-cookie", "a=1; Path=/")])
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (b"first\n", b"second\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(3)
            self.wfile.write(b"0\r\n\r\n")
            return
        return super().do_GET()


def ws_conn(c):
    f = c.makefile("rb")
    f.readline()
    headers = {}
    while True:
        line = f.readline().decode().strip()
        if not line:
            break
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    accept = base64.b64encode(hashlib.sha1(
        (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    while True:
        h = f.read(2)
        if len(h) < 2:
            return
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8:
            c.sendall(b"\x88\x00")
            return
        if op == 9:
            op = 10
        if len(data) < 126:
            hdr = bytes([0x80 | op, len(data)])
        elif len(data) < 65536:
            hdr = bytes([0x80 | op, 126]) + struct.pack(">H", len(data))
        else:
            hdr = bytes([0x80 | op, 127]) + struct.pack(">Q", len(data))
        c.sendall(hdr + data)


def ws_server():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8765))
    s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=ws_conn, args=(c,), daemon=True).start()


threading.Thread(target=ws_server, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), App).serve_forever()
