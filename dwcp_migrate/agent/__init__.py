"""The host agent: carries QEMU migration streams between hosts (see docs/AGENT.md)."""
