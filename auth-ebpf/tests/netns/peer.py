#!/usr/bin/env python3
"""A pod's process for the netns tests. It runs inside the pod's cgroup and
network namespace (the harness puts it there before exec), so every socket it
opens belongs to that cgroup. Commands come on stdin, one per line; each
answer is one line on stdout.

  serve PORT [udp]        listen on [::]:PORT and echo (TCP) / reply (UDP)
  connect HOST PORT T     open a TCP connection (timeout T s): "ok" | "fail <why>"
  send TEXT T             send TEXT on the open connection, wait T s for the
                          echo: "ok" | "fail <why>"
  udp HOST PORT TEXT T    one UDP request/response: "ok" | "fail <why>"
  quit
"""
import socket
import sys
import threading


def echo_tcp(conn):
    with conn:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)


def serve_tcp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)

    def loop():
        while True:
            conn, _ = s.accept()
            threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def serve_udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))

    def loop():
        while True:
            data, addr = s.recvfrom(4096)
            s.sendto(data, addr)

    threading.Thread(target=loop, daemon=True).start()


def main():
    conn = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "serve":
                if len(words) > 2 and words[2] == "udp":
                    serve_udp(int(words[1]))
                else:
                    serve_tcp(int(words[1]))
                out = "ok"
            elif cmd == "connect":
                if conn:
                    conn.close()
                conn = socket.create_connection((words[1], int(words[2])), timeout=float(words[3]))
                out = "ok"
            elif cmd == "send":
                conn.settimeout(float(words[2]))
                msg = words[1].encode()
                conn.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise OSError("connection closed")
                    got += chunk
                out = "ok" if got == msg else "fail mismatch"
            elif cmd == "udp":
                fam = socket.AF_INET6 if ":" in words[1] else socket.AF_INET
                u = socket.socket(fam, socket.SOCK_DGRAM)
                u.settimeout(float(words[4]))
                u.sendto(words[3].encode(), (words[1], int(words[2])))
                data, _ = u.recvfrom(4096)
                u.close()
                out = "ok" if data == words[3].encode() else "fail mismatch"
            elif cmd == "quit":
                return
            else:
                out = "fail unknown command " + cmd
        except Exception as e:  # the answer says what failed
            out = "fail " + type(e).__name__ + ": " + str(e).replace("\n", " ")
        print(out, flush=True)


main()
