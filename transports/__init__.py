"""Transports that carry an encoded migration between two agents (TCP sessions, RDMA)."""
