"""The VPC control plane: sans-IO responders for the frames the C switch
punts (ARP requests, DHCP, traffic to the gateway address).

Nothing here touches a socket or the switch: ``VpcResponder.handle(port,
frame)`` takes one Ethernet frame and returns the frames to send back to
that port. ``nitro.devices.net.fabric.NetFabric`` moves frames between the
switch's punt queue and these objects.
"""

from nitro.vpc.responder import Interface, VpcResponder, gateway_mac

__all__ = ["Interface", "VpcResponder", "gateway_mac"]
