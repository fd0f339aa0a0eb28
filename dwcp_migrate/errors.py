"""The one error hierarchy of dwcp-migrate.

Every error a user can meet derives from :class:`DwcpError` and carries a message that says
what happened and what to do. Errors raised because of another exception wrap it
(``raise X(...) from exc``) so the cause stays visible in logs.

::

    DwcpError
     ├── ConfigError            a bad configuration file or option
     ├── MissingDependencyError the machine lacks something (a binary, root, a kernel feature)
     ├── TestbedError           the test bed could not be built, used or torn down
     │    ├── GuestError        a test guest failed to build, boot, fill or verify
     │    └── LinkError         an emulated link could not be set up
     └── MigrationError         a migration failed; the VM keeps running on the source
"""

from __future__ import annotations


class DwcpError(Exception):
    """Root of every error dwcp-migrate raises on purpose."""


class ConfigError(DwcpError):
    """A configuration file or option is invalid."""


class MissingDependencyError(DwcpError):
    """The machine lacks something dwcp-migrate needs (a binary, privileges, a kernel feature)."""


class TestbedError(DwcpError):
    """The test bed could not be built, used or torn down."""

    __test__ = False  # not a pytest test class despite the name


class GuestError(TestbedError):
    """A test guest failed to build, boot, fill its working set or verify its memory."""


class LinkError(TestbedError):
    """An emulated network link could not be set up or measured."""


class MigrationError(DwcpError):
    """A migration failed. The VM is left running on the source; the message says why."""
