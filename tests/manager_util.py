"""Driving a `CacheManager` by hand in tests: every command it returns carried out at once."""

from __future__ import annotations

from expertd.daemon.core.events import Predict, Reply, StartTransfer
from expertd.daemon.core.manager import CacheManager


def settle(manager: CacheManager, commands) -> tuple[list[Reply], list[StartTransfer]]:
    """Finish every transfer, in order; the replies and every transfer that ran."""
    replies, started, queue = [], [], list(commands)
    while queue:
        command = queue.pop(0)
        if isinstance(command, StartTransfer):
            started.append(command)
            queue.extend(manager.transfer_done(command.transfer_id, True))
        elif isinstance(command, Reply):
            replies.append(command)
        elif isinstance(command, Predict):  # a hit's prediction work, after its reply
            queue.extend(manager.predict(command))
    return replies, started
