"""virtio-blk (virtio 1.2 section 5.2) served over vhost-user."""
