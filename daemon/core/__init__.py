"""The pure cache core: the manager, its slots, transfers, prefetching and tenants; no sockets, no I/O."""
