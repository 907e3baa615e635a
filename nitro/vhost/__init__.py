"""vhost-user: wire vocabulary, sans-IO codec, vring state, dispatcher, trio server.

Names follow QEMU's docs/interop/vhost-user.rst. Only ``server.py`` touches
a socket. ``protocol`` and ``codec`` are sans-IO (bytes and fds in, typed
messages out). ``vring`` and ``backend`` do no socket I/O but do touch the
system: they own and close the fds they are given, drive the C datapath
(which maps guest memory), and ``backend`` creates the inflight memfd
(GET_INFLIGHT_FD).
"""
