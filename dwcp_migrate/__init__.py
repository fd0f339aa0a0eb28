"""dwcp-migrate: a live-migration accelerator for libvirt/QEMU hypervisors."""

__version__ = "0.1.0"
