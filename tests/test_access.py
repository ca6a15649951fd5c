"""Clients of another user: the socket group may map the slabs too (systemd's User=expertd)."""

from __future__ import annotations

import grp
import os
import stat

from daemon_util import DaemonProcess

from expertd.daemon.store.pack import pack_synthetic


def test_the_socket_group_may_map_the_shared_memory_slabs_read_only(short_dir):
    """A socket the group may open is no use if the weights stay owner-only (0600)."""
    group = grp.getgrgid(os.getgid()).gr_name
    store = short_dir / "store"
    pack_synthetic(store, "olmoe-1b-7b", scale=32, layers=1)
    config = short_dir / "expertd.toml"
    config.write_text(f'[auth]\nsocket_group = "{group}"\n')
    daemon = DaemonProcess(
        store, short_dir, "--config", str(config), "--host-size", "8 slots", "--device", "cpu",
        "--device-size", "8 slots",  # OLMoE's top-8: the least a tier may hold
    )  # fmt: skip
    try:
        slabs = daemon.slab_files()
        assert len(slabs) == 2  # host and the cpu device tier
        for path in daemon.shm_files():  # the residency tables too
            info = os.stat(path)
            assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == os.getgid(), path
    finally:
        daemon.kill()


def test_without_a_socket_group_the_slabs_stay_owner_only(short_dir):
    store = short_dir / "store"
    pack_synthetic(store, "olmoe-1b-7b", scale=32, layers=1)
    daemon = DaemonProcess(store, short_dir, "--host-size", "8 slots")
    try:
        (path,) = daemon.slab_files()
        for path in daemon.shm_files():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    finally:
        daemon.kill()
