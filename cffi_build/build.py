"""cffi builder for nitro's C datapath (``nitro._nitro_c``).

setup.py names ``cffi_build/build.py:ffibuilder``; ``python cffi_build/build.py``
builds the extension in place (next to the ``nitro`` package) for quick
iteration. The ABI headers (nitro.h, nitro_crypto.h, nitro_net.h,
nitro_tunnel.h) are both C headers and the cdef: cffi's parser takes the
declarations and integer ``#define`` lines, so every other preprocessor line
is dropped here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Every nitro_*.c is part of the extension. The ABI (the cdef) is nitro.h plus
# one header per subsystem that has C entry points of its own; other headers
# (nitro_vring.h, nitro_pkt.h, ...) are internal to the C files.
# C, and one C++ file: librbd's bufferlist reads (nitro_rbd_bl.cpp).
SOURCES = sorted(p.name for p in [*HERE.glob("nitro_*.c"), *HERE.glob("nitro_*.cpp")])
HEADERS = sorted(p.name for p in HERE.glob("nitro*.h"))
ABI_HEADERS = [h for h in ("nitro.h", "nitro_crypto.h", "nitro_net.h", "nitro_tunnel.h",
                          "nitro_nbd.h", "nitro_rbd.h")
               if (HERE / h).exists()]

_INT_DEFINE = re.compile(r"#\s*define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\b")


def cdef_source(header: Path) -> str:
    """nitro.h with every preprocessor line except integer #defines removed."""
    lines = []
    for line in header.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _path(name: str) -> str:
    """A path to a file in cffi_build/, relative when building from the repo
    root (setuptools and sdists prefer relative sources), else absolute."""
    full = HERE / name
    if Path.cwd().resolve() == ROOT:
        return str(full.relative_to(ROOT))
    return str(full)


def make_builder() -> cffi.FFI:
    builder = cffi.FFI()
    for h in ABI_HEADERS:
        builder.cdef(cdef_source(HERE / h))
    builder.set_source(
        "nitro._nitro_c",
        "".join(f'#include "{h}"\n' for h in ABI_HEADERS),
        sources=[_path(s) for s in SOURCES],
        depends=[_path(h) for h in HEADERS],
        include_dirs=[str(HERE)],
        # OpenSSL EVP for the AES-XTS datapath; liburing for the engine's blk
        # I/O; libseccomp for the workers' system call filter; libnbd for
        # volumes on an NBD export; librbd and librados (Debian librbd-dev)
        # for RBD volumes; libstdc++ for the one C++ file (librbd's C++ API,
        # nitro_rbd_bl.cpp).
        libraries=["crypto", "uring", "seccomp", "nbd", "rbd", "rados", "stdc++"],
        # -Werror: a warning in the datapath is a bug until shown otherwise.
        # Hidden visibility: Python reaches C only through cffi, inside this
        # object, so the module init is its one exported symbol. One list
        # for C and C++ (an extension has no per-language one), so no
        # -std: the compiler's defaults apply (Debian 12's GCC 12: gnu17,
        # gnu++17; a GCC 15 would build C as gnu23).
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # From the root, paths are relative, so objects stay under cffi_build/;
    # the module lands in ROOT/nitro/.
    os.chdir(ROOT)
    make_builder().compile(tmpdir=".", verbose=True)
