"""nitro: an offload service for QEMU/KVM guests over vhost-user."""

__version__ = "0.1.0"
