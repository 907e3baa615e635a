"""Test guest: initramfs builder (build.py) and QEMU runner (qemu.py)."""
