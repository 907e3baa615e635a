"""virtio-net (virtio 1.2 section 5.1) served over vhost-user, switched by
nitro's C VPC switch (cffi_build/nitro_switch.c).

- ``device.py``  NetDevice: the backend contract for one [[net]] interface
- ``config.py``  feature bits and struct virtio_net_config (sans-IO)
- ``fabric.py``  NetFabric: the switch, VPC responders, punt loop, uplinks
- ``uplink.py``  host TAP devices (created with /dev/net/tun, set up with pyroute2)
"""
