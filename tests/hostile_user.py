"""A hostile second local user against a real daemon: the machinery of bench/faults.py's
hostile-local-user section (each attempt here is also a test in tests/test_local_trust.py).

Acts as `nobody` through forked children (`daemon_util.run_as`), so it needs root. Every
attempt counts as a success (for the attacker), a refusal, or a crash (the daemon or a
client died, or answered something other than the named refusal).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import zmq
from daemon_util import EXPERTD, DaemonProcess, ping, run_as

from expertd.client import ExpertClient
from expertd.daemon import protocol as proto

NOBODY = pwd.getpwnam("nobody")
CLAIMS = ("alice", "root", "operator", "default-but-not", "ALICE")


def _tally() -> dict[str, int]:
    return {"attempts": 0, "successes": 0, "refused": 0, "crashes": 0}


def hijack(store: Path, work: Path, attempts: int) -> dict[str, int]:
    """`nobody` makes the socket directory first (0777), then root starts serve; and `nobody`
    binds a socket in a directory it owns, then root's client and `expertd status` connect."""
    out = _tally()
    for i in range(attempts):
        hostile = work / f"hijack-{i}"
        hostile.mkdir()
        os.chown(hostile, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(hostile, 0o777)
        address = f"ipc://{hostile}/expertd.sock"
        run = subprocess.run(
            [*EXPERTD, "serve", "--store", str(store), "--address", address], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        out["attempts"] += 1
        if run.returncode == 1 and "is owned by nobody" in run.stderr:
            out["refused"] += 1
        elif "Traceback" in run.stderr:
            out["crashes"] += 1
        else:
            out["successes"] += 1
        impostor = zmq.Context.instance().socket(zmq.ROUTER)
        impostor.bind(address)
        try:
            for connect in (_client_connects, _status_connects):
                out["attempts"] += 1
                verdict = connect(address)
                if impostor.poll(200):
                    out["successes"] += 1  # something (a hello, a token) reached the impostor
                    impostor.recv_multipart()
                else:
                    out[verdict] += 1
        finally:
            impostor.close(linger=0)
    return out


def _client_connects(address: str) -> str:
    try:
        ExpertClient(address, admin_token="secret", connect_timeout_s=1).close()
        return "successes"
    except proto.UntrustedSocket:
        return "refused"
    except Exception:  # noqa: BLE001 - anything else is a crash of the check
        return "crashes"


def _status_connects(address: str) -> str:
    run = subprocess.run(
        [*EXPERTD, "status", "--address", address, "--timeout-s", "1"], capture_output=True, text=True
    )
    if run.returncode == 1 and "is owned by nobody" in run.stderr:
        return "refused"
    return "crashes" if "Traceback" in run.stderr else "successes"


def _as_nobody(address: str, claims: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """In the child: claim other tenants, then try every admin operation as itself."""
    claim, admin = _tally(), _tally()
    for tenant in claims:
        claim["attempts"] += 1
        try:
            with ExpertClient(address, tenant=tenant, connect_timeout_s=5) as client:
                own = client.stats().get("tenant")
            claim["successes" if own == tenant else "refused"] += 1
        except proto.PermissionDenied:
            claim["refused"] += 1
        except Exception:  # noqa: BLE001
            claim["crashes"] += 1
    with ExpertClient(address, connect_timeout_s=5) as client:
        for op in ("shutdown", "load_state", "stats"):
            admin["attempts"] += 1
            try:
                if op == "shutdown":
                    client.shutdown()
                elif op == "load_state":
                    client.load_state("/etc/passwd")
                elif "tiers" in client.stats():  # every tenant's view: an admin's
                    raise AssertionError("a non-admin saw the shared tiers")
                else:
                    admin["refused"] += 1  # only its own tenant's counters
                    continue
                admin["successes"] += 1
            except proto.PermissionDenied:
                admin["refused"] += 1
            except AssertionError:
                admin["successes"] += 1
            except Exception:  # noqa: BLE001
                admin["crashes"] += 1
    return {"tenant_claims": claim, "admin_ops": admin}


def _starve(address: str, wait_s: float) -> dict[str, int]:
    """One client tries to pin more than its share; two pin their pool full; a third must hear why."""
    out = _tally()
    with ExpertClient(address) as greedy, ExpertClient(address) as second, ExpertClient(address) as third:
        cap = int(greedy.info["tiers"]["device"]["max_pinned"])  # half of what its partition has
        out["attempts"] += 1
        try:
            greedy.acquire(0, list(range(cap + 1))).release()
            out["successes"] += 1  # it pinned past the cap
        except proto.CapacityError:
            out["refused"] += 1
        held = [greedy.acquire(0, list(range(cap))), second.acquire(1, list(range(cap)))]
        out["attempts"] += 1
        started = time.monotonic()
        try:
            third.acquire(0, [7]).release()
            out["successes"] += 1  # served from a full tier? then nothing starved
        except proto.CapacityError as exc:
            named = "waiting for capacity" in str(exc) and time.monotonic() - started < wait_s + 2
            out["refused" if named else "crashes"] += 1
        except proto.ExpertdError:
            out["crashes"] += 1  # a timeout that does not say why
        for lease in held:
            lease.release()
    return out


def _as(fn, *args):
    """``fn(*args)`` as `nobody` (its group only); an error in the child is raised here."""
    result = run_as(NOBODY.pw_uid, NOBODY.pw_gid, fn, *args, groups=(NOBODY.pw_gid,))
    if isinstance(result, dict) and set(result) == {"error"}:
        raise RuntimeError(f"as nobody, {fn.__name__}: {result['error']}")
    return result


def hostile_local_user(store: Path, work: Path, attempts: int = 5) -> dict:
    """Every attempt above, against daemons that must stay up; counts per kind, plus daemon health.

    ``work`` and the directories above it must let `nobody` in (0755, as /run is).
    """
    report: dict = {"hijack": hijack(store, work, attempts)}
    run_dir = work / "served"
    os.chmod(work, 0o755)
    (work / "tenants.toml").write_text(
        '[auth]\nsocket_group = "nogroup"\n[clients]\ncapacity_wait_s = 1.0\n'
        '[tenants.alice]\nisolation = "partitioned"\nshare = 0.5\nusers = ["root"]\n'
    )
    daemon = DaemonProcess(
        store, run_dir, "--config", str(work / "tenants.toml"), "--device", "cpu", "--device-size", "8 slots",
        address=f"ipc://{run_dir}/run/expertd.sock",
    )  # fmt: skip
    try:
        for _ in range(attempts):
            seen = run_as(
                NOBODY.pw_uid, NOBODY.pw_gid, _as_nobody, daemon.address, CLAIMS, groups=(NOBODY.pw_gid,)
            )
            for kind, counts in seen.items():
                total = report.setdefault(kind, _tally())
                for key in total:
                    total[key] += counts[key]
        report["starving_client"] = _tally()
        for _ in range(attempts):
            counts = run_as(
                NOBODY.pw_uid, NOBODY.pw_gid, _starve, daemon.address, 1.0, groups=(NOBODY.pw_gid,)
            )
            for key, value in counts.items():
                report["starving_client"][key] += value
        report["daemon_up"] = ping(daemon.address)
        report["internal_errors"] = daemon.log().count("internal error")
    finally:
        daemon.kill()
    return report
