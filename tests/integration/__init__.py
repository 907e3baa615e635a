"""Integration tests: real processes on temporary sockets, no guests."""
