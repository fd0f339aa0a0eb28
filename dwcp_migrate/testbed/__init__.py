"""The test bed: hosts as network namespaces, emulated LAN/WAN links, libvirt daemons and
QEMU test guests, used by the tests, the benchmarks and the demo.

Everything a bed starts is recorded by :class:`~dwcp_migrate.testbed.procs.Reaper` in a state
directory, so teardown finds it again, also after an interrupted run.
"""
