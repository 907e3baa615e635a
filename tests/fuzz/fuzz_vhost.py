"""atheris entry point for the vhost-user target (tests/fuzz/vhost_target.py).

    python tests/fuzz/fuzz_vhost.py CORPUS_DIR [libFuzzer flags...]

e.g. -atheris_runs=1000000 or -max_total_time=15; crashes are written as
crash-<sha1> in the current directory (or -artifact_prefix=).
"""

import logging
import os
import sys

import atheris

with atheris.instrument_imports(include=["nitro"]):
    from nitro.vhost import backend, codec, protocol, vring  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.fuzz.vhost_target import run_one  # noqa: E402

logging.disable(logging.CRITICAL)  # REPLY_ACK failures are logged: expected here
DISK_FD = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
os.ftruncate(DISK_FD, 128 * 512)


def test_one_input(data: bytes) -> None:
    run_one(data, DISK_FD)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
