"""The machine a result holds for: the CPU's identity and the results' file names.

The kernels' ranking differs between CPUs (AVX2 only, AVX-512, AMX), so every result file
and headline names the CPU (cpu-epyc-zen4-2core, cpu-xeon-spr-2core). Shared by
benchmarks/ and experiments/.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_identity", "cpu_slug", "machine_slug", "device_detail"]

# (vendor, family, lowest model, highest model) -> microarchitecture, from the vendors'
# published family/model numbers; an unlisted CPU is named by its numbers instead.
_UARCH = [
    ("AuthenticAMD", 23, 0x00, 0x2F, "zen1"), ("AuthenticAMD", 23, 0x30, 0xFF, "zen2"),
    ("AuthenticAMD", 25, 0x00, 0x0F, "zen3"), ("AuthenticAMD", 25, 0x10, 0x1F, "zen4"),
    ("AuthenticAMD", 25, 0x20, 0x5F, "zen3"), ("AuthenticAMD", 25, 0x60, 0xAF, "zen4"),
    ("AuthenticAMD", 26, 0x00, 0xFF, "zen5"),
    ("GenuineIntel", 6, 0x55, 0x55, "skx"), ("GenuineIntel", 6, 0x6A, 0x6C, "icx"),
    ("GenuineIntel", 6, 0x8F, 0x8F, "spr"), ("GenuineIntel", 6, 0xCF, 0xCF, "emr"),
    ("GenuineIntel", 6, 0xAD, 0xAE, "gnr"),
]


def cpu_identity(cpuinfo: str | None = None) -> dict[str, str]:
    """vendor, family, model, model name and flags of the first CPU in /proc/cpuinfo (empty
    strings where unreadable, e.g. off Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    out = {"vendor_id": "", "cpu family": "", "model": "", "model name": "", "flags": ""}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() in out:
            out[key.strip()] = value.strip()
    return out


def cpu_slug(info: dict[str, str] | None = None) -> str:
    """epyc-zen4, xeon-spr, ...: the CPU's line and microarchitecture, or its family and
    model numbers where they are not in the table (the machine a result holds for)."""
    info = cpu_identity() if info is None else info
    name = info["model name"].lower()
    line = next((w for w in ("epyc", "ryzen", "threadripper", "xeon", "core") if w in name), "")
    if not line:
        line = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info["vendor_id"], platform.machine())
    try:
        fam, mod = int(info["cpu family"]), int(info["model"])
    except ValueError:
        return line
    arch = next((a for v, f, lo, hi, a in _UARCH if v == info["vendor_id"] and f == fam and lo <= mod <= hi),
                f"f{fam}m{mod}")
    return f"{line}-{arch}"


def machine_slug(device: torch.device) -> str:
    """cpu-epyc-zen4-2core or gpu-nvidia-h100: the results' file name. The CPU's model is in
    it because the kernels' ranking differs between CPUs (AVX2 only, AVX-512, AMX)."""
    if device.type == "cuda":
        words = torch.cuda.get_device_name(device).lower().split()[:2]
        return "gpu-" + "-".join("".join(c for c in w if c.isalnum()) for w in words)
    return f"cpu-{cpu_slug()}-{os.cpu_count()}core"


def device_detail(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    info = cpu_identity()
    model = info["model name"] or platform.processor() or platform.machine()
    flags = set(info["flags"].split())
    isa = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    ident = f" (family {info['cpu family']}, model {info['model']}, {cpu_slug(info)}{', ' + isa if isa else ''})"
    return f"{model}{ident if info['cpu family'] else ''}, {os.cpu_count()} cores"
