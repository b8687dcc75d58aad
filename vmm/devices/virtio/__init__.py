"""virtio devices in three parts: the split virtqueue (queue), the virtio-mmio
transport (mmio), and device types (block) over backends (vmm.devices.disk)."""
