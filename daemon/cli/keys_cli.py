"""`expertd keys`: CURVE keys for tcp:// clients, each bound to a tenant and a role."""

from __future__ import annotations

import argparse
from pathlib import Path

from expertd.daemon.cli.main import CliError


def register(subparsers) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="CURVE keys for tcp:// (who may connect, as which tenant)",
        description="Manage the keys of a daemon served over tcp:// ([auth] keys_dir).",
    )
    commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    commands.required = True
    new = commands.add_parser("new", help="make a keypair: NAME.key (public) and NAME.key_secret")
    new.add_argument("name", nargs="?", help="client name (omit with --server)")
    new.add_argument("--server", action="store_true", help="the daemon's own key, in --dir")
    new.add_argument("--dir", type=Path, default=Path("."), help="where to write (default: .)")
    new.set_defaults(func=run_new)
    allow = commands.add_parser("allow", help="let a client's public key connect as a tenant")
    allow.add_argument("public_key", type=Path, help="the client's NAME.key")
    allow.add_argument("--tenant", required=True)
    allow.add_argument("--role", choices=("client", "admin"), default="client")
    allow.add_argument("--name", help="name to list it under (default: from the file)")
    allow.add_argument("--dir", type=Path, required=True, help="the daemon's [auth] keys_dir")
    allow.set_defaults(func=run_allow)
    listing = commands.add_parser("list", help="the allowed clients, their tenants and roles")
    listing.add_argument("--dir", type=Path, required=True, help="the daemon's [auth] keys_dir")
    listing.set_defaults(func=run_list)
    revoke = commands.add_parser("revoke", help="stop a client from connecting (at the next daemon start)")
    revoke.add_argument("name")
    revoke.add_argument("--dir", type=Path, required=True, help="the daemon's [auth] keys_dir")
    revoke.set_defaults(func=run_revoke)


def run_new(args: argparse.Namespace) -> int:
    from expertd.daemon.service.auth import SERVER_KEY, AuthError, new_keypair

    if args.server == bool(args.name):
        raise CliError("give a client NAME, or --server for the daemon's key")
    try:
        public, secret = new_keypair(args.dir, SERVER_KEY if args.server else args.name)
    except AuthError as exc:
        raise CliError(str(exc)) from None
    print(f"public key {public}\nsecret key {secret} (keep it; readable by you only)")
    return 0


def run_allow(args: argparse.Namespace) -> int:
    from expertd.daemon.service.auth import AuthError, allow

    try:
        path = allow(args.dir, args.public_key, args.tenant, args.role, args.name)
    except AuthError as exc:
        raise CliError(str(exc)) from None
    print(f"allowed {path.stem} as tenant {args.tenant} ({args.role}); restart the daemon to apply")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from expertd.daemon.service.auth import AuthError, load_clients

    try:
        clients = load_clients(args.dir)
    except AuthError as exc:
        raise CliError(str(exc)) from None
    print(f"{'name':<24} {'tenant':<16} {'role':<7} public key")
    for key in sorted(clients.values(), key=lambda k: k.name):
        print(f"{key.name:<24} {key.tenant:<16} {key.role:<7} {key.public_key}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from expertd.daemon.service.auth import AuthError, revoke

    try:
        revoke(args.dir, args.name)
    except AuthError as exc:
        raise CliError(str(exc)) from None
    print(f"revoked {args.name}; restart the daemon to apply")
    return 0
