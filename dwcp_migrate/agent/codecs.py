"""The agent's use of the stream and page codecs (filled in when dwcp_migrate.codec lands)."""

from __future__ import annotations

from typing import Any

from dwcp_migrate.agent.config import CodecSettings
from dwcp_migrate.errors import MigrationError
from dwcp_migrate.policies.datapath import LinkSample


def make_encoder(settings: CodecSettings, link: LinkSample) -> Any:
    raise MigrationError("encoded mode is not available yet; set codec.mode: passthrough")


def make_decoder(settings: CodecSettings, description: Any) -> Any:
    raise MigrationError("encoded mode is not available yet")
