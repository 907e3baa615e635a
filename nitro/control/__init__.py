"""The local control socket: ``nitro status`` and ``nitro reload`` talk to
the running daemon over it.

Layers, each importable without those after it:

* :mod:`~nitro.control.protocol`: the wire format (JSON lines), sans-IO:
  request parsing, reply building, typed errors.
* :mod:`~nitro.control.commands`: what each command does with the daemon
  (a :class:`~nitro.control.commands.DaemonView`); sans-IO, bytes in and out.
* :mod:`~nitro.control.server`: the trio transport (the daemon's side).
* :mod:`~nitro.control.client`: a blocking client (the CLI's side; no trio).

Rendering a status for people is the CLI's business (``nitro/status_format.py``).
"""
