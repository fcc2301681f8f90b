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
