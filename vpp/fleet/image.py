"""A registry as one compact binary image, for the next process to start from without a full
database read (``store.fleet_cache`` keeps it in the state store). Pure: bytes in, bytes out.

Layout: ``MAGIC``, a little-endian uint32 header length, the header (JSON: row count, code
tables, the tenants, caller metadata, and per part its name, dtype, raw and stored length and
the CRC-32 of the stored bytes), then the parts, each LZ4-compressed (Arrow's codec; it
decompresses at several GB/s, where zstd's smaller image took longer to unpack than the
smaller transfer saved). Parts: the ids as one blob (UTF-8, each followed by b"\\n"), tenant
codes, the registry's code and float columns as numpy buffers, and the state store's chunk
positions (``export_positions``), so a cold start joins the store's answer without hashing a
million ids. :func:`decode` checks every length and checksum and raises ``ValueError`` on any
damage: a bad image is a reason to read the database, never a wrong registry.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from vpp.fleet.ids import IdIndex
from vpp.fleet.registry import REGISTRY_COLUMNS, Registry

MAGIC = b"VPPREG01"
_CODEC = "lz4"
# Columns stored as numpy buffers, in this order (device_ids and tenant_ids are coded apart).
_ARRAY_COLUMNS = (
    "region_codes",
    "kind_codes",
    "vendor_codes",
    "feeder_codes",
    "enrolled",
    *REGISTRY_COLUMNS[7:],
)
_CODED = (("region_codes", "regions"), ("vendor_codes", "vendors"), ("feeder_codes", "feeders"))


def encode(
    registry: Registry,
    meta: Mapping[str, Any],
    positions: Mapping[str, Mapping[bytes, npt.NDArray[np.intp]]] | None = None,
) -> bytes | None:
    """The image of ``registry`` (which must hold no tombstones) with ``meta`` (JSON-able) and
    the chunk positions; None if it cannot be imaged (an id holding a newline)."""
    if registry.removed is not None and registry.removed.any():
        raise ValueError("encode: compact the registry first")
    c = registry.columns
    ids = c["device_ids"].tolist()
    blob = ("\n".join(ids) + "\n").encode() if ids else b""
    if blob.count(b"\n") != len(ids):
        return None
    tenant_codes, tenants = _factorize(c["tenant_ids"])
    raw: list[tuple[str, str, bytes]] = [("ids", "S1", blob), ("tenant", "<i4", tenant_codes)]
    for name in _ARRAY_COLUMNS:
        a = np.ascontiguousarray(c[name])
        raw.append((name, a.dtype.str, a.tobytes()))
    for what, by_digest in sorted((positions or {}).items()):
        digests = list(by_digest)
        sizes = np.array([len(by_digest[d]) for d in digests], dtype="<i4")
        rows = [np.asarray(by_digest[d], dtype="<i4") for d in digests]
        raw.append((f"pos:{what}:digests", "S1", b"".join(digests)))
        raw.append((f"pos:{what}:sizes", "<i4", sizes.tobytes()))
        raw.append((f"pos:{what}:rows", "<i4", np.concatenate(rows).tobytes() if rows else b""))
    parts, stored = [], []
    for name, dtype, data in raw:
        packed = pa.compress(data, codec=_CODEC, asbytes=True) if data else b""
        parts.append([name, dtype, len(data), len(packed), zlib.crc32(packed)])
        stored.append(packed)
    header = {
        "n": len(ids),
        "regions": registry.regions,
        "vendors": registry.vendors,
        "feeders": registry.feeders,
        "tenants": tenants,
        "meta": dict(meta),
        "parts": parts,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *stored])


def decode_header(data: bytes) -> dict[str, Any]:
    """The image's header (its ``meta`` among it), checked for shape; ValueError if damaged."""
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a registry image")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + size])
        parts = header["parts"]
        total = start + size + sum(int(p[3]) for p in parts)
        int(header["n"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"registry image header: {exc}") from exc
    if total != len(data):
        raise ValueError(f"registry image: {len(data)} bytes, header says {total}")
    header["_offset"] = start + size
    return dict(header)


def decode(
    data: bytes,
) -> tuple[Registry, dict[str, Any], dict[str, dict[bytes, npt.NDArray[np.intp]]]]:
    """The registry, the caller's ``meta`` and the chunk positions of an image; ValueError if
    any part is damaged (lengths, checksums, row counts, codes out of their tables)."""
    try:
        return _decode(data)
    except ValueError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise ValueError(f"registry image: {type(exc).__name__} {exc}") from exc


def _decode(
    data: bytes,
) -> tuple[Registry, dict[str, Any], dict[str, dict[bytes, npt.NDArray[np.intp]]]]:
    header = decode_header(data)
    n = int(header["n"])
    pos = int(header["_offset"])
    arrays: dict[str, np.ndarray] = {}
    blobs: dict[str, Any] = {}
    for name, dtype, raw_len, stored_len, crc in header["parts"]:
        packed = data[pos : pos + stored_len]
        pos += stored_len
        if zlib.crc32(packed) != crc:
            raise ValueError(f"registry image: part {name} fails its checksum")
        try:
            # An Arrow buffer (mutable): the columns are numpy views of it, writable, no copy.
            out = (
                pa.decompress(packed, decompressed_size=raw_len, codec=_CODEC)
                if raw_len
                else pa.py_buffer(b"")
            )
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"registry image: part {name}: {exc}") from exc
        if out.size != raw_len:
            raise ValueError(f"registry image: part {name} unpacks to {out.size} bytes")
        if dtype == "S1":
            blobs[name] = out.to_pybytes()
        else:
            arrays[name] = (
                np.frombuffer(out, dtype=np.dtype(dtype)) if raw_len else np.zeros(0, dtype)
            )
    ids = blobs["ids"].decode().split("\n")[:-1] if n else []
    if len(ids) != n:
        raise ValueError(f"registry image: {len(ids)} ids for {n} rows")
    tenants = np.array(header["tenants"], dtype=object)
    tenant_codes = arrays["tenant"]
    columns: dict[str, np.ndarray] = {"device_ids": np.array(ids, dtype=object)}
    if len(tenant_codes) != n or (
        n and not 0 <= tenant_codes.min() <= tenant_codes.max() < len(tenants)
    ):
        raise ValueError("registry image: tenant codes do not fit their table")
    columns["tenant_ids"] = tenants[tenant_codes] if n else np.zeros(0, dtype=object)
    for name in _ARRAY_COLUMNS:
        a = arrays[name]
        if len(a) != n:
            raise ValueError(f"registry image: column {name} has {len(a)} rows for {n}")
        columns[name] = a
    for col, table in _CODED:
        codes = columns[col]
        if n and not 0 <= codes.min() <= codes.max() < len(header[table]):
            raise ValueError(f"registry image: {col} do not fit their table")
    try:
        index = IdIndex.build(columns["device_ids"])
    except ValueError as exc:
        raise ValueError(f"registry image: {exc}") from exc
    registry = Registry(columns, header["regions"], header["vendors"], header["feeders"], index)
    positions: dict[str, dict[bytes, npt.NDArray[np.intp]]] = {}
    for what in {k.split(":")[1] for k in blobs if k.startswith("pos:")}:
        digests = blobs[f"pos:{what}:digests"]
        sizes = arrays[f"pos:{what}:sizes"]
        rows = arrays[f"pos:{what}:rows"].astype(np.intp)
        if len(digests) != 16 * len(sizes) or int(sizes.sum()) != len(rows):
            raise ValueError(f"registry image: positions of {what} do not add up")
        if len(rows) and not -1 <= rows.min() <= rows.max() < n:
            raise ValueError(f"registry image: positions of {what} out of range")
        ends = np.cumsum(sizes)
        positions[what] = {
            digests[16 * i : 16 * i + 16]: rows[end - size : end]
            for i, (size, end) in enumerate(zip(sizes.tolist(), ends.tolist(), strict=True))
        }
    return registry, dict(header["meta"]), positions


def _factorize(values: np.ndarray) -> tuple[bytes, list[str]]:
    codes, uniques = pd.factorize(values, sort=False, use_na_sentinel=False)
    return codes.astype("<i4").tobytes(), [str(u) for u in uniques]
