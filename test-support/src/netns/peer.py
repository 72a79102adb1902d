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
  connectfrom HOST PORT SPORT T
                          a TCP connection from local port SPORT, then one
                          echo: "ok" | "fail <why>"
  seen PORT               the UDP payloads the server on PORT received,
                          comma-separated: "seen a,b" | "seen -"
  rawsyn SRC DST SPORT DPORT NEXT T
                          a raw TCP SYN (IPv6 with NEXT Destination Options
                          headers before TCP, or IPv4 if the addresses are),
                          then wait T s for a SYN-ACK to SPORT from DST:DPORT:
                          "synack" | "none"
  rawtcp SRC SPORT DST DPORT FLAGS
                          one raw TCP segment with any source (FLAGS hex):
                          "ok" | "eperm" (dropped by this pod's egress)
  rawudp SRC SPORT DST DPORT TEXT
                          one raw UDP datagram with any source: "ok" | "eperm"
  quit

The raw commands are what an attacker who owns a pod with CAP_NET_RAW can
send: any source address, any header chain.
"""
import ipaddress
import select
import socket
import struct
import sys
import threading
import time

SEEN = {}  # UDP port -> payloads received


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
    SEEN[port] = []

    def loop():
        while True:
            data, addr = s.recvfrom(4096)
            SEEN[port].append(data.decode(errors="replace"))
            s.sendto(data, addr)

    threading.Thread(target=loop, daemon=True).start()


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def l4_checksum(src, dst, proto, seg):
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(seg))
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(seg), proto)
    return checksum(pseudo + seg)


def tcp_segment(src, dst, sport, dport, flags, seq=1000):
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    c = l4_checksum(src, dst, 6, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp_datagram(src, dst, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = l4_checksum(src, dst, 17, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def ip_packet(src, dst, proto, l4, dstopts=0):
    """A whole IP packet; for IPv6, `dstopts` Destination Options headers
    (8 bytes each: next header, length 0, a PadN option) before `l4`."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                          s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        return hdr + l4
    ext = b""
    for i in range(dstopts):
        nxt = 60 if i + 1 < dstopts else proto
        ext += struct.pack("!BBBB4x", nxt, 0, 1, 4)
    first = 60 if dstopts else proto
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), first, 64, s.packed, d.packed)
    return hdr + ext + l4


def raw_send(dst, pkt):
    """"ok" when the packet left, "eperm" when this pod's own egress
    program dropped it (the kernel answers the sender EPERM)."""
    if ipaddress.ip_address(dst).version == 4:
        r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        r.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    else:
        # IPPROTO_RAW on AF_INET6: the packet carries its own IPv6 header.
        r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        r.sendto(pkt, (dst, 0))
        return "ok"
    except PermissionError:
        return "eperm"
    finally:
        r.close()


def raw_syn(src, dst, sport, dport, nexthdrs, timeout):
    """Sends a SYN behind `nexthdrs` Destination Options headers and waits
    for the SYN-ACK (seen through a raw TCP socket, which gets a copy of
    every TCP segment this namespace receives)."""
    fam = socket.AF_INET if ipaddress.ip_address(dst).version == 4 else socket.AF_INET6
    cap = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP)
    if raw_send(dst, ip_packet(src, dst, 6, tcp_segment(src, dst, sport, dport, 0x02),
                               nexthdrs)) == "eperm":
        cap.close()
        return "none"
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([cap], [], [], left)[0]:
            cap.close()
            return "none"
        data, addr = cap.recvfrom(65535)
        if fam == socket.AF_INET:
            data = data[(data[0] & 0xF) * 4:]  # IPv4 raw sockets include the header
        if ipaddress.ip_address(addr[0]) != ipaddress.ip_address(dst) or len(data) < 14:
            continue
        sp, dp = struct.unpack("!HH", data[:4])
        if sp == dport and dp == sport and data[13] & 0x12 == 0x12:
            cap.close()
            return "synack"


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
            elif cmd == "connectfrom":
                fam = socket.AF_INET6 if ":" in words[1] else socket.AF_INET
                c = socket.socket(fam, socket.SOCK_STREAM)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.settimeout(float(words[4]))
                try:
                    c.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(words[3])))
                    c.connect((words[1], int(words[2])))
                    c.sendall(b"hi")
                    got = c.recv(16)
                    out = "ok" if got == b"hi" else "fail mismatch"
                finally:
                    c.close()
            elif cmd == "seen":
                got = SEEN.get(int(words[1]), [])
                out = "seen " + (",".join(got) if got else "-")
            elif cmd == "rawsyn":
                out = raw_syn(words[1], words[2], int(words[3]), int(words[4]), int(words[5]),
                              float(words[6]))
            elif cmd == "rawtcp":
                src, dst = words[1], words[3]
                seg = tcp_segment(src, dst, int(words[2]), int(words[4]), int(words[5], 16))
                out = raw_send(dst, ip_packet(src, dst, 6, seg))
            elif cmd == "rawudp":
                src, dst = words[1], words[3]
                dg = udp_datagram(src, dst, int(words[2]), int(words[4]), words[5].encode())
                out = raw_send(dst, ip_packet(src, dst, 17, dg))
            elif cmd == "quit":
                return
            else:
                out = "fail unknown command " + cmd
        except Exception as e:  # the answer says what failed
            out = "fail " + type(e).__name__ + ": " + str(e).replace("\n", " ")
        print(out, flush=True)


main()
