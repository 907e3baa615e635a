"""A VPC across hosts: fleet state in etcd (hosts, VPCs, interfaces), the
Geneve/ESP tunnels between nitro hosts and the keys that protect them
(docs/fleet.md)."""
