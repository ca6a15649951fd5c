"""The daemon service: the ZeroMQ server, its listener, the copy engine, auth, config, slabs, metrics."""
