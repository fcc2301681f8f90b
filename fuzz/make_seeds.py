#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into seeds/<target>/ (committed;
run again after changing a target's input format). Seeds taken from real objects
(a chunk, a map page, a manifest, a lease record) were copied from a blockd bucket."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    body = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body


def req(cmd, off, length, flags=0, handle=1, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, handle, off, length) + payload


# nbd_server: first byte = read step; then the client's bytes.
flags = struct.pack(">I", 3)
io = (req(1, 0, 4096, 1, 1, b"\x5a" * 4096) + req(0, 0, 4096, 0, 2) + req(3, 0, 0, 0, 3)
      + req(4, 4096, 8192, 0, 4) + req(6, 0, 4096, 0, 5) + req(7, 0, 65536, 0, 6)
      + req(0, 1 << 30, 512, 0, 7) + req(1, 511, 512, 0, 8, b"\x01" * 512) + req(2, 0, 0, 0, 9))
put("nbd_server", "go-io", b"\xff" + flags + opt(7, go("fz", [0, 1, 2, 3])) + io)
put("nbd_server", "structured", b"\x03" + flags + opt(8) + opt(10, meta("fz", ["base:allocation"]))
    + opt(9, meta("fz", ["base:"])) + opt(7, go("fz")) + io)
put("nbd_server", "list-info-exportname", b"\x01" + flags + opt(3) + opt(6, go("ro", [3]))
    + opt(6, go("busy")) + opt(5) + opt(1, b"ro") + req(1, 0, 512, 0, 1, b"\0" * 512)
    + req(0, 0, 512, 0, 2))
put("nbd_server", "abort", b"\x10" + flags + opt(99, b"xyz") + opt(2))

# nbd_proto: headers and option payloads.
put("nbd_proto", "request", req(1, 4096, 4096, 1, 7))
put("nbd_proto", "option", opt(7, go("fz", [3])))
put("nbd_proto", "meta", meta("fz", ["base:allocation", "qemu:dirty-bitmap:x"]))
put("nbd_proto", "block-status", struct.pack(">IIIII", 1, 4096, 0, 512, 3) + b"\x00" * 4)

# virtio_blk_request: regions, limits, descriptors, then guest bytes.
def virtio(nregions_regions, limits, descs, guest):
    b = bytes([len(nregions_regions) - 1])
    for base, hi, pages in nregions_regions:
        b += struct.pack("<H", base) + bytes([hi, pages - 1])
    cap, ro, maxd, shift, dsec, dseg, wsec, wseg = limits
    b += struct.pack("<IBHBIBIB", cap, ro, maxd, shift, dsec, dseg, wsec, wseg)
    b += bytes([len(descs) - 1])
    for sel, off, length in descs:
        b += bytes([sel]) + struct.pack("<H", off)
        b += struct.pack("<I", length) if sel & 0x40 else struct.pack("<H", length)
    return b + guest

lim = (2048, 0, 0x1000, 4, 2048, 4, 2048, 4)
read_hdr = struct.pack("<IIQ", 0, 0, 8)    # VIRTIO_BLK_T_IN, sector 8
write_hdr = struct.pack("<IIQ", 1, 0, 16)  # VIRTIO_BLK_T_OUT
put("virtio_blk_request", "read", virtio([(0, 0, 1)], lim, [(0, 0, 16), (1, 512, 512), (1, 2048, 1)], read_hdr))
put("virtio_blk_request", "write-2regions", virtio([(0, 0, 1), (16, 0, 2)], lim,
    [(0, 0, 16), (1, 512, 0), (2, 16, 1024), (1, 3000, 1)], write_hdr))
put("virtio_blk_request", "discard", virtio([(0, 0, 1)], lim, [(0, 0, 16), (0, 16, 16), (1, 100, 1)],
    struct.pack("<IIQ", 11, 0, 0) + struct.pack("<QII", 0, 8, 0)))
put("virtio_blk_request", "flush-getid", virtio([(0, 0, 1)], lim, [(0, 0, 16), (1, 64, 1)],
    struct.pack("<IIQ", 4, 0, 0)))

# api_bodies: first byte = which parser (0-6 REST bodies, 7 runtime frames, 8 management
# socket requests, 9 names and durations); then the bytes.
import json


def body(sel, obj):
    return bytes([sel]) + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def frame(obj):
    b = json.dumps(obj).encode()
    return struct.pack(">I", len(b)) + b


def http(method, target, payload=b"", chunked=False):
    head = f"{method} {target} HTTP/1.1\r\nHost: sprite\r\n"
    if chunked:
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + (
            f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n")
    return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


put("api_bodies", "org", body(0, {"name": "acme"}))
put("api_bodies", "token", body(1, {"name": "ci"}))
put("api_bodies", "sprite", body(2, {"name": "web-1", "url_auth": "public",
                                     "settings": {"vcpus": 2, "memory_mib": 1024, "idle_warm_secs": 5}}))
put("api_bodies", "update", body(3, {"settings": {"http_port": 3000, "idle_cold_secs": 60}}))
put("api_bodies", "hibernate", body(4, {"mode": "cold"}))
put("api_bodies", "fork", body(5, {"checkpoint": "v3", "name": "copy"}))
put("api_bodies", "exec", body(6, {"args": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "tty": True,
                                   "rows": 24, "cols": 80, "stdin": "aGkK"}))
put("api_bodies", "frames", bytes([7]) + frame({"id": 1, "ev": "ok", "value": {"version": 1}})
    + frame({"id": 2, "ev": "error", "message": "no", "code": "not_found"})
    + frame({"id": 3, "op": "exec", "args": ["true"]}))
put("api_bodies", "task-post", bytes([8]) + http("POST", "/v1/tasks", b'{"name":"t1","expire":"30m"}'))
put("api_bodies", "task-put", bytes([8]) + http("PUT", "/v1/tasks/t1", b'{"expire":60}', chunked=True))
put("api_bodies", "task-delete", bytes([8]) + http("DELETE", "/v1/tasks/t1"))
put("api_bodies", "service-put", bytes([8]) + http("PUT", "/v1/services/web?duration=0",
    b'{"cmd":"httpd","args":["-f"],"needs":["db"],"http_port":3000}'))
put("api_bodies", "service-signal", bytes([8]) + http("POST", "/v1/services/web/signal", b'{"signal":"TERM"}'))
put("api_bodies", "names", bytes([9]) + b"30m")
