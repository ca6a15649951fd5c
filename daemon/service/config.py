"""`expertd serve` configuration: a TOML file, every key documented, unknown keys are errors.

The schema is the `KEYS` table below; `docs/config.md` is generated from it
(`expertd serve --print-config-doc`), so code and documentation cannot disagree.
Command-line flags override the file (`ServeConfig.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expertd.daemon.core import defaults
from expertd.daemon.core.cache_core import ISOLATION_MODES, Isolation
from expertd.daemon.protocol.local import default_address
from expertd.daemon.protocol.socket_trust import resolve_group, resolve_user


class ConfigError(ValueError):
    """A configuration file or flag is wrong; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str  # "str", "int", "float", "size", "path", "choice:a|b", "bool"
    default: Any
    doc: str

    @property
    def attr(self) -> str:
        return f"{self.section}_{self.name}" if self.section not in ("", "server") else self.name


KEYS: tuple[Key, ...] = (
    Key("server", "store", "path", None, "Store directory made by `expertd pack` (required)."),
    Key(
        "server",
        "address",
        "str",
        None,
        "ZeroMQ endpoint: ipc://PATH (default under $RUNTIME_DIRECTORY, "
        "else $XDG_RUNTIME_DIR, else /tmp/expertd-UID) or tcp://HOST:PORT.",
    ),  # fmt: skip
    Key(
        "server", "log_level", "choice:debug|info|warning|error", "info", "Log verbosity (to stderr/journal)."
    ),
    Key(
        "tiers",
        "host_size",
        "size",
        "1GiB",
        "Host (RAM) tier budget: bytes with a unit (512MiB, 8GiB) "
        'or a slot count ("120 slots"). Allocated once at start, never exceeded.',
    ),  # fmt: skip
    Key(
        "tiers",
        "device",
        "choice:off|cpu|cuda",
        "off",
        "Device tier: off (clients compute from host "
        "slots), cpu (a second shared-memory slab stands in for GPU memory), cuda (GPU memory).",
    ),  # fmt: skip
    Key(
        "tiers",
        "device_size",
        "size",
        "256MiB",
        "Device tier budget, as host_size. Ignored when device = off.",
    ),
    Key("tiers", "cuda_device", "int", 0, "CUDA device index for device = cuda."),
    Key(
        "policy",
        "host",
        "str",
        defaults.HOST_POLICY,
        "Eviction policy of the host tier (see `expertd replay --help`).",
    ),
    Key(
        "policy",
        "device",
        "str",
        defaults.DEVICE_POLICY,
        "Eviction policy of the device tier; `predictive` evicts by the predictors' estimated next use.",
    ),  # fmt: skip
    Key(
        "prefetch",
        "predictor",
        "str",
        defaults.PREFETCH["predictor"],
        "Predictor that guesses the next layers' experts (`none`: "
        "no prefetching; see `expertd replay --help`). Each tenant gets its own.",
    ),  # fmt: skip
    Key("prefetch", "depth", "int", defaults.PREFETCH["depth"], "Layers ahead to prefetch."),
    Key(
        "prefetch",
        "min_prob",
        "float",
        defaults.PREFETCH["min_prob"],
        "Guesses less likely than this are not fetched.",
    ),
    Key("prefetch", "budget", "int", defaults.PREFETCH["budget"], "New prefetches per acquire at most."),
    Key("prefetch", "width", "int", defaults.PREFETCH["width"], "Prefetches per layer at most."),
    Key(
        "prefetch",
        "share",
        "float",
        defaults.PREFETCH["share"],
        "Most of a link's transfers prefetches may take, over any `window` consecutive ones "
        "(demand transfers are never limited).",
    ),  # fmt: skip
    Key("prefetch", "window", "int", defaults.PREFETCH["window"], "Transfers `share` is counted over."),
    Key(
        "prefetch",
        "state",
        "path",
        None,
        "Predictor statistics every tenant starts from (a warm start): a file written by "
        "`expertd replay TRACE --save-state FILE` for this model and predictor.",
    ),  # fmt: skip
    Key("transfers", "load_threads", "int", 4, "Store reads in flight at once (reader threads)."),
    Key("transfers", "h2d_depth", "int", 1, "Host->device copies in flight at once."),
    Key("transfers", "max_queued_prefetches", "int", 256, "Prefetches queued per link; more are dropped."),
    Key(
        "transfers",
        "direct_io",
        "choice:auto|on|off",
        "auto",
        "O_DIRECT store reads: auto uses them where the filesystem allows.",
    ),  # fmt: skip
    Key(
        "auth",
        "socket_group",
        "str",
        None,
        "ipc:// only: a group that may connect too (socket mode 0660); unset: the daemon's user only (0600).",
    ),  # fmt: skip
    Key(
        "auth",
        "ipc_admin",
        "choice:owner|token|all",
        "owner",
        "ipc:// only: who may shutdown, see every tenant's stats and load predictor statistics: "
        "owner: clients running as the daemon's own user or root (as the kernel reports them); "
        "token: holders of the admin token (a 0600 file beside the socket); all: every client "
        "that can open the socket.",
    ),  # fmt: skip
    Key(
        "auth",
        "keys_dir",
        "path",
        None,
        "CURVE keys (`expertd keys`): server.key_secret and clients/*.key, "
        "each client bound to a tenant and role. Required for tcp://, which is refused without it.",
    ),  # fmt: skip
    Key(
        "clients",
        "lease_timeout_s",
        "float",
        10.0,
        "A client silent this long (no message, no heartbeat) loses its leases.",
    ),  # fmt: skip
    Key("clients", "heartbeat_s", "float", 1.0, "How often clients are told to send a heartbeat."),
    Key("clients", "max_clients", "int", 64, "Connected clients at most; more are refused."),
    Key("clients", "max_pending", "int", 16, "Unanswered acquires per client at most."),
    Key(
        "clients",
        "max_pinned_share",
        "float",
        0.5,
        "Most of a tier one client may pin at once (leased, or asked for by its waiting acquires), "
        "but never less than one layer's top-k; an acquire past it is refused at once, so one client "
        "cannot starve the rest. 1: no cap.",
    ),  # fmt: skip
    Key(
        "clients",
        "capacity_wait_s",
        "float",
        5.0,
        "An acquire that waits this long for slots other clients pin is refused, naming how many "
        "slots they pin (instead of waiting until the client gives up).",
    ),  # fmt: skip
    Key(
        "metrics",
        "port",
        "int",
        0,
        "Serve what `expertd status` shows as Prometheus metrics at http://ADDRESS:PORT/metrics; "
        "0: off. Needs `pip install 'expertd[metrics]'`.",
    ),  # fmt: skip
    Key(
        "metrics",
        "address",
        "str",
        "127.0.0.1",
        "Address the metrics endpoint listens on. packaging/expertd.service lets only this host's "
        "addresses through (`IPAddressAllow=localhost`): a remote scraper needs an `IPAddressAllow=` "
        "drop-in.",
    ),  # fmt: skip
)
_KEY_INDEX = {(k.section, k.name): k for k in KEYS}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|slots?)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6}
_UNITS |= {"gb": 10**9, "tb": 10**12}


@dataclasses.dataclass(frozen=True)
class Size:
    """A tier budget: bytes, or a number of slots."""

    amount: int
    unit: str  # "bytes" or "slots"

    def slots(self, slot_bytes: int) -> int:
        return self.amount if self.unit == "slots" else self.amount // slot_bytes

    def __str__(self) -> str:
        if self.unit == "slots":
            return f"{self.amount} slots"
        for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if self.amount % factor == 0:
                return f"{self.amount // factor}{unit}"
        return f"{self.amount / 2**20:.3g}MiB" if self.amount >= 2**20 else f"{self.amount}B"


def parse_size(text: object, where: str) -> Size:
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return Size(text, "bytes")
    match = _SIZE.match(str(text)) if isinstance(text, str) else None
    if not match:
        raise ConfigError(f'{where}: {text!r} is not a size (e.g. 512MiB, 8GiB, "120 slots")')
    number, unit = float(match[1]), (match[2] or "B").lower()
    if unit.startswith("slot"):
        if not number.is_integer() or number < 1:
            raise ConfigError(f"{where}: {text!r}: slot count must be a positive integer")
        return Size(int(number), "slots")
    amount = int(number * _UNITS[unit])
    if amount < 1:
        raise ConfigError(f"{where}: {text!r} must be positive")
    return Size(amount, "bytes")


def _convert(key: Key, value: Any) -> Any:
    where = f"[{key.section}] {key.name}"
    if key.kind == "size":
        return parse_size(value, where)
    if key.kind == "path":
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if key.kind.startswith("choice:"):
        choices = key.kind.split(":", 1)[1].split("|")
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    if key.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
        return value
    if key.kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{where}: expected a positive number, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Validated settings of one daemon; attribute names are ``section_key`` (server keys bare)."""

    values: Mapping[str, Any]
    source: str = "defaults"

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<config>") -> ServeConfig:
        values = {k.attr: (_convert(k, k.default) if k.default is not None else None) for k in KEYS}
        values["tenants"] = {}
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{section}] must be a table, got {table!r:.40}")
            if section == "tenants":
                values["tenants"] = {name: _tenant(name, t, source) for name, t in table.items()}
                continue
            for name, value in table.items():
                key = _KEY_INDEX.get((section, name))
                if key is None:
                    known = ", ".join(k.name for k in KEYS if k.section == section)
                    hint = f" (known in [{section}]: {known})" if known else " (unknown section)"
                    raise ConfigError(f"{source}: unknown key [{section}] {name}{hint}")
                values[key.attr] = _convert(key, value)
        return cls(values, source)

    @classmethod
    def load(cls, path: Path) -> ServeConfig:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_mapping(data, str(path))

    def with_overrides(self, overrides: Mapping[str, Any]) -> ServeConfig:
        """Flags win over the file; ``overrides`` maps ``section.key`` to a raw value (None: unset)."""
        values = dict(self.values)
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, name = dotted.rpartition(".")
            key = _KEY_INDEX[(section or "server", name)]
            values[key.attr] = _convert(key, value)
        return ServeConfig(values, self.source)

    def checked(self) -> ServeConfig:
        """Cross-key checks, once everything is merged."""
        if self.store is None:
            raise ConfigError(f"{self.source}: [server] store is required (or --store)")
        if self.address is None:
            return ServeConfig({**self.values, "address": default_address()}, self.source).checked()
        if not re.match(r"^(ipc|tcp)://.+", self.address):
            raise ConfigError(f"[server] address {self.address!r} must start with ipc:// or tcp://")
        if not self.clients_max_pinned_share <= 1:
            raise ConfigError(
                f"[clients] max_pinned_share {self.clients_max_pinned_share} must be a fraction in (0, 1]"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"[metrics] port {self.metrics_port} is not a TCP port (1-65535, or 0: off)")
        if self.address.startswith("tcp://") and self.auth_keys_dir is None:
            raise ConfigError(
                f"[server] address {self.address} is tcp://: [auth] keys_dir is required (CURVE keys; "
                "`expertd keys new --server`)"
            )
        return self


@dataclasses.dataclass(frozen=True)
class TenantPolicy(Isolation):
    """How one tenant is isolated from the others, and who it is ([tenants.NAME] in the config)."""

    uids: frozenset[int] = frozenset()  # ipc://: clients running as these users are this tenant
    gids: frozenset[int] = frozenset()  # ...or with one of these groups

    @property
    def binds_anyone(self) -> bool:
        return bool(self.uids or self.gids)

    def binds(self, uid: int, gids: set[int]) -> bool:
        return uid in self.uids or not self.gids.isdisjoint(gids)


def _tenant(name: str, table: object, source: str) -> TenantPolicy:
    where = f"{source}: [tenants.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - {"isolation", "share", "users", "groups"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: isolation, share, users, groups)"
        )
    isolation = table.get("isolation", "shared")
    if isolation not in ISOLATION_MODES:
        raise ConfigError(f"{where} isolation: {isolation!r} is not one of {', '.join(ISOLATION_MODES)}")
    share = table.get("share", 1.0)
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
        raise ConfigError(f"{where} share: {share!r} must be a fraction in (0, 1]")
    ids = {}
    for key, resolve in (("users", resolve_user), ("groups", resolve_group)):
        names = table.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
            raise ConfigError(f"{where} {key}: expected a list of names or ids, got {names!r:.60}")
        try:
            ids[key] = frozenset(resolve(n) for n in names)
        except KeyError as exc:
            raise ConfigError(f"{where} {key}: {exc.args[0]}") from None
    return TenantPolicy(isolation, float(share), ids["users"], ids["groups"])


def config_doc() -> str:
    """Markdown reference of every key, generated from `KEYS`."""
    lines = [
        "# expertd.toml reference",
        "",
        "Generated from `expertd/daemon/service/config.py`. Unknown keys are errors.",
        "",
    ]
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines += ["", f"## [{section}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        default = "-" if key.default is None else f"`{key.default}`"
        kind = key.kind.replace("choice:", "one of ").replace("|", ", ")
        lines.append(f"| `{key.name}` | {kind} | {default} | {key.doc} |")
    lines += [
        "",
        "## [tenants.NAME]",
        "",
        "One table per tenant that is not simply `shared` (tenants not listed are shared).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        "| `isolation` | one of shared, partitioned, private | `shared` | shared: one cache for all, "
        "fastest, and a tenant can tell from a fast acquire that another used an expert "
        "(a timing side channel). "
        "partitioned: its own slots, no residency shared. private: copies are shared but every reply "
        "is timed as if its cache were its own (see docs/security.md). |",
        "| `share` | fraction in (0, 1] | `1.0` | partitioned: its part of each tier's slots; private: "
        "the size of the private cache its replies are timed against. |",
        "| `users` | list of user names or uids | `[]` | ipc://: clients running as these users are "
        "this tenant, whatever they claim; no other user may claim it (the daemon's own user and root "
        "may act as any tenant). |",
        "| `groups` | list of group names or gids | `[]` | ipc://: as `users`, for members of these "
        "groups. |",
        "",
        "Over ipc:// a client of another user that no tenant lists is the tenant named after its "
        "user; over tcp:// the tenant is its CURVE key's (`expertd keys allow`).",
    ]
    return "\n".join(lines) + "\n"
