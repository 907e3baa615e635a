"""The fleet: hosts, VPCs and interfaces shared through etcd (docs/fleet.md)."""
