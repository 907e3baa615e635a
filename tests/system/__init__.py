"""System tests: real QEMU guests (TCG) and third-party frontends/backends."""
