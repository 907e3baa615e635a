"""A VPC across hosts: fleet state in etcd, Geneve/ESP tunnels between
nitro hosts and the keys that protect them (docs/fleet.md)."""
