"""vhost-user: wire vocabulary, sans-IO codec, vring state, dispatcher, trio server.

Names follow QEMU's docs/interop/vhost-user.rst. Only ``server.py`` touches
a socket; ``protocol``, ``codec``, ``vring`` and ``backend`` are sans-IO.
"""
