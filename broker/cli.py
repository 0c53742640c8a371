"""Command line: broker run | check | status | explain | replay.

Exit codes: 0 success, 1 runtime error or invalid policy, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from broker import __version__
from broker import policy as policy_mod
from broker import state as state_mod
from broker.errors import BrokerError, PolicyError
from broker.units import format_rate

log = logging.getLogger("broker")

EXAMPLES = """\
examples:
  broker check                          validate /etc/broker/policies.d (like nginx -t)
  broker check my-policy.yaml           validate one file
  broker run                            the daemon (normally started by broker.service)
  broker run --dry-run -v               log what would be written, change nothing
  broker status                         per-user slots and counters
  broker status --json                  the same for scripts

signals understood by `broker run`:
  SIGHUP    reload policies; an invalid policy is rejected and the last good one stays
  SIGTERM   return every process home, remove slots and BPF programs, exit
  SIGINT    same as SIGTERM
"""


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, which journald reads from stderr."""

    PRIORITIES = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger("broker")
    root.handlers[:] = [handler]
    root.setLevel(
        logging.DEBUG
        if verbose > 1
        else logging.INFO
        if verbose or _is_daemon()
        else logging.WARNING
    )


def _is_daemon() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "run"


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description=(
            "Keep warm cgroup v2 slices per user and move a user's process into one "
            "when it accepts a connection (eBPF tracepoint on accept)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-vv for debug)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="PATH",
        help="policy file or directory (repeatable; default /etc/broker/policies.d, else the bundled default)",
    )
    run.add_argument(
        "--cgroup-root",
        metavar="CGROUP",
        help="delegated cgroup for the slots (default: the cgroup of broker-slots.service; 'self': the daemon's own cgroup, for systemd-run --scope -p Delegate=yes)",
    )
    run.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state and status files (default /run/broker)",
    )
    run.add_argument(
        "--tick",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="control-loop period in seconds (default 1)",
    )
    run.add_argument(
        "--ring-entries",
        type=int,
        metavar="BYTES",
        help="BPF ring buffer size in bytes, a power of two multiple of the page size (default 262144)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="log the cgroup writes instead of making them",
    )

    check = sub.add_parser(
        "check", help="validate policy files and exit (0 valid, 1 invalid)"
    )
    check.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or directories (default /etc/broker/policies.d)",
    )

    status = sub.add_parser(
        "status", help="show per-user slots and counters of the running daemon"
    )
    status.add_argument(
        "--json", action="store_true", help="print the raw status as JSON"
    )
    status.add_argument(
        "--prometheus",
        action="store_true",
        help="print the status in Prometheus text format",
    )
    status.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the daemon writes status (default /run/broker)",
    )

    explain = sub.add_parser("explain", help="show how a user's pool was sized")
    explain.add_argument("user", help="user name or uid")
    explain.add_argument("--json", action="store_true", help="print as JSON")
    explain.add_argument("--state-dir", metavar="DIR", help="default /run/broker")
    _add_replay(sub, argv)
    for command in sub.choices.values():
        # An unknown option after a command is reported with that command's usage.
        command.set_defaults(command_parser=command)
    return parser


REPLAY_HELP = "replay a demand trace offline and compare pool-sizing methods"


def _add_replay(sub: Any, argv: Sequence[str]) -> None:
    """Register `replay`; its module imports numpy and scikit-learn, so only when needed."""
    if "replay" in argv or "-h" in argv or "--help" in argv or not argv:
        from broker.replay import add_parser

        add_parser(sub)
    else:
        sub.add_parser("replay", help=REPLAY_HELP)


def cmd_check(args: argparse.Namespace) -> int:
    paths = policy_mod.resolve_policy_paths(args.paths)
    try:
        policy = policy_mod.load(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"policy check failed: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    for line in policy_mod.advice(policy):
        print(f"warning: {line}", file=sys.stderr)
    managed = len(policy.managed_users())
    print(
        f"policy ok: {policy.summary()}; {managed} managed user(s) on this host; "
        f"files: {policy.source_names()}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from broker.daemon import DaemonOptions, run

    if os.geteuid() != 0 and not args.dry_run:
        print(
            "broker run: needs root (it writes cgroupfs and loads BPF programs)",
            file=sys.stderr,
        )
        return 1
    options = DaemonOptions(
        policy_paths=args.policy,
        cgroup_root=args.cgroup_root,
        state_dir=args.state_dir,
        tick=args.tick,
        dry_run=args.dry_run,
        ring_entries=args.ring_entries,
    )
    return run(options)


def read_status(state_dir: str | None) -> dict[str, Any]:
    """Return the daemon's status.json; raise BrokerError if it is missing or invalid."""
    directory = state_mod.state_dir(state_dir)
    path = directory / state_mod.STATUS_FILE
    try:
        status = state_mod.load_status(directory)
    except FileNotFoundError as exc:
        raise BrokerError(
            f"no status in {directory}: is the daemon running? (systemctl status broker)"
        ) from exc
    except PermissionError as exc:
        raise BrokerError(f"cannot read {directory}: run as root") from exc
    except OSError as exc:
        raise BrokerError(f"failed to read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        # A truncated or foreign file raises JSONDecodeError or UnicodeDecodeError.
        raise BrokerError(
            f"{path}: invalid JSON ({exc}); restart the daemon to rewrite it"
        ) from exc
    if not (
        isinstance(status, dict)
        and isinstance(status.get("daemon"), dict)
        and isinstance(status.get("users"), dict)
    ):
        raise BrokerError(
            f"{path}: expected an object with daemon and users objects; "
            "restart the daemon to rewrite it"
        )
    return status


def cmd_status(args: argparse.Namespace) -> int:
    status = read_status(args.state_dir)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    if args.prometheus:
        from broker import metrics

        print(metrics.render(status), end="")
        return 0
    try:
        print(format_status(status))
    except (KeyError, TypeError) as exc:
        raise _status_field_error(args.state_dir, exc) from exc
    return 0


def _status_field_error(state_dir: str | None, exc: Exception) -> BrokerError:
    """Return the error for a status.json whose fields another broker version wrote."""
    path = state_mod.state_dir(state_dir) / state_mod.STATUS_FILE
    return BrokerError(
        f"{path}: field {exc} is missing or of the wrong type; restart the "
        "daemon, or run the broker of the same version"
    )


def format_status(status: dict[str, Any]) -> str:
    daemon = status["daemon"]
    age = time.time() - daemon.get("updated", 0)
    lines = [
        f"broker pid {daemon['pid']}, cgroup root {daemon['cgroup_root']}, updated {age:.0f}s ago",
        f"policy: {', '.join(daemon['policy_sources'])}",
        f"events {daemon['events']}, ring-buffer drops {daemon['ring_buffer_drops']}",
    ]
    if daemon.get("last_reload_error"):
        lines.append("last reload REJECTED (previous policy in force):")
        lines.extend(f"  {e}" for e in daemon["last_reload_error"])
    latency = status.get("latency_us", {})
    if latency.get("count"):
        lines.append(
            f"accept-to-move latency over {latency['count']}: median {latency['median']:.0f} us, "
            f"p99 {latency['p99']:.0f} us"
        )
    header = f"{'USER':<12} {'UID':>6} {'FREE':>4} {'BUSY':>4} {'ACTIV':>6} {'MISS':>5} {'RECL':>5} {'OPEN':>5} {'DROPS':>5}  PLACED"
    lines.append(header)
    for uid, user in status["users"].items():
        counters = user["counters"]
        placed = " ".join(str(p) for p in user["placed"]) or "-"
        lines.append(
            f"{(user['name'] or '?'):<12} {uid:>6} {user['slots_free']:>4} {user['slots_busy']:>4} "
            f"{counters['activations']:>6} {counters['misses']:>5} {counters['reclaims']:>5} "
            f"{user['open_connections']:>5} {user['drops']:>5}  {placed}"
        )
        for row in user.get("bandwidth", []):
            lines.append(
                f"{'':<12} {'':>6} class {row['handle']} on {row['interface']}: "
                f"rate {format_rate(row['rate'])} ceil {format_rate(row['ceil'])} "
                f"({row['tier'] or 'idle'}), sent {row['bytes']} B, drops {row['drops']}"
            )
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    status = read_status(args.state_dir)
    uid = _resolve_uid(args.user)
    try:
        return _explain(uid, status, args.json)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _status_field_error(args.state_dir, exc) from exc


def _explain(uid: int, status: dict[str, Any], as_json: bool) -> int:
    user = status["users"].get(str(uid))
    if user is None:
        print(
            f"broker explain: uid {uid} is not managed by the running daemon",
            file=sys.stderr,
        )
        return 1
    plan = user.get("plan")
    if as_json:
        print(json.dumps({"uid": uid, "plan": plan, "slots": user["slots"]}, indent=2))
        return 0
    if plan is None:
        print(
            f"uid {uid}: static pool from the policy (forecast disabled): "
            + ", ".join(f"{s['tier']}" for s in user["slots"])
        )
        return 0
    print(plan.get("text", json.dumps(plan, indent=2)))
    return 0


def _resolve_uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError as exc:
        raise BrokerError(f"user {text!r} not found in the passwd database") from exc


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "status": cmd_status,
    "explain": cmd_explain,
}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Options before the command belong to the top level, after it to the command.
        before = list(argv).index(args.command)
        owner = parser if unknown[0] in argv[:before] else args.command_parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(args.verbose)
    handler = COMMANDS.get(args.command)
    if handler is None:
        from broker.replay import run as run_replay

        handler = run_replay
    try:
        return handler(args)
    except BrokerError as exc:
        print(f"broker {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
