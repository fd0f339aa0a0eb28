"""The agent's codec set-up: the page cache is sized from the guest's RAM (MEM_SIZE at the
start of the main channel), within the configured limit; idle agents unmap pooled caches."""

from __future__ import annotations

from dwcp_migrate.agent.codecs import cache_bytes_for, guest_ram_bytes
from dwcp_migrate.agent.config import CodecSettings
from dwcp_migrate.pagecodec import memory
from tests.stream_fixtures import PAGE, typical_multifd, typical_stream


def test_guest_ram_from_the_main_channel_start() -> None:
    stream = typical_stream()
    assert guest_ram_bytes(stream) == 80 * PAGE  # pc.ram 64 pages + pc.bios 16
    assert guest_ram_bytes(stream[:60]) is None  # MEM_SIZE not reached yet
    assert guest_ram_bytes(typical_multifd()) is None  # a multifd channel has none
    assert guest_ram_bytes(b"not a migration stream") is None


def test_cache_is_the_guest_ram_within_the_limit() -> None:
    settings = CodecSettings(cache_mib=1024)
    assert cache_bytes_for(settings, None) == 1024 << 20
    assert cache_bytes_for(settings, 512 << 20) == 512 << 20
    assert cache_bytes_for(settings, (512 << 20) + 1) == (512 << 20) + PAGE  # whole pages
    assert cache_bytes_for(settings, 8 << 30) == 1024 << 20
    assert cache_bytes_for(settings, 0) == 1024 << 20


def test_release_pool_unmaps_pooled_caches() -> None:
    class Owner:
        pass

    owner = Owner()
    arena, touched = memory.new_arena(owner, 1 << 20)
    arena[:4] = b"abcd"
    touched[0] = 4
    del owner, arena  # the finalizer pools the mapping
    assert memory.release_pool() >= 1 << 20
    assert memory.release_pool() == 0
