"""The ``fieldgate`` command. Each verb parses its arguments and calls one function elsewhere.

Exit codes: 0 done, 1 failed while running, 2 refused before starting (bad config or usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import runtime
from gateway.core.errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, FieldgateError

if TYPE_CHECKING:
    from gateway.store import SeqMarks


def _setup_logging(level: str, worker: str | None = None, log_format: str = "text") -> None:
    if log_format == "json":
        from gateway.ops.logs import JsonFormatter, WorkerField

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        if worker:
            handler.addFilter(WorkerField(worker))
        logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
        return
    where = f"[worker {worker}] " if worker else ""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- verbs ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway.app import Gateway
    from gateway.config.sources import file_hash
    from gateway.enroll import load_for

    if args.config is None:
        from gateway.edge import env as edge_env

        # No --config: started by the IoT Edge runtime, the config comes from the module twin.
        if edge_env.detected(os.environ):
            return cmd_edge_run(args)
        print(
            "fieldgate run: --config is required (or run as an IoT Edge module: the runtime "
            "sets the IOTEDGE_* variables)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    config_file = Path(args.config)
    # The hash of the bytes validated: read once, so that the hash is of what runs.
    raw = config_file.read_bytes() if config_file.is_file() else b""
    cfg = config_mod.load(args.config)
    # The pinned fingerprints beside the config: a malformed file refuses the start here.
    enrolment = load_for(args.config)
    os.umask(0o077)  # state files 0600, state folders 0700, whoever creates them
    share = None
    if args.worker:
        from functools import partial

        from gateway.workers import parse_worker, worker_config

        index, count = parse_worker(args.worker)
        # A reload takes this worker's share of the new file, as the start did.
        share = partial(worker_config, index=index, count=count)
        if cfg.metrics is not None and index == 0:
            # One [metrics] address cannot serve several processes: workers serve none.
            logging.getLogger("fieldgate").warning(
                "metrics.listen: not served with --workers (one address cannot serve several "
                "processes); `fieldgate status --config` reaches every worker"
            )
        cfg = share(cfg)
    elif args.workers > 1:
        from gateway.workers import run_workers

        return run_workers(config_file, args.workers, cfg)
    gateway = Gateway(
        cfg,
        adopt_stranded=not args.worker,
        enrolment=enrolment,
        config_file=config_file,
        config_hash=file_hash(raw),
        share=share,
    )

    async def main(stop: asyncio.Event) -> None:
        await gateway.run(stop)

    # SIGHUP reloads the config file (gateway.reload), it does not stop the gateway.
    runtime.run(main, on_hangup=gateway.hangup)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from gateway.reload import reload

    return reload(Path(args.config), timeout=args.timeout, as_json=args.json)


def cmd_edge_run(args: argparse.Namespace) -> int:
    """Module mode (``fieldgate edge run``, or ``fieldgate run`` without --config when the
    IOTEDGE_* variables are set): see gateway/edge/module.py."""
    from gateway.edge import env as edge_env

    env = edge_env.read(os.environ)  # exit 2 naming a missing variable, before any import
    from gateway.edge.module import EdgeModule, sdk_missing, staged_apply

    missing = sdk_missing()
    if missing:
        print(f"fieldgate: {missing}", file=sys.stderr)
        return EXIT_REFUSED

    os.umask(0o077)
    trust = getattr(args, "trust_file", None) or os.environ.get(
        "FIELDGATE_EDGE_TRUST_FILE",
        str(Path(tempfile.gettempdir()) / "fieldgate-edge" / "edgehub-roots.pem"),
    )
    module = EdgeModule(
        env,
        trust_file=Path(trust),
        stage=staged_apply,
        report_interval=getattr(args, "report_interval", 1.0),
        base=Path.cwd(),
    )
    runtime.run(module.run)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway.ops import status

    cfg = config_mod.load(args.config, check_files=False)
    docs = status.ask_gateway(cfg)
    if args.json:
        print(
            json.dumps(
                docs[0][1] if docs[0][0] is None else {"workers": [d for _, d in docs]}, indent=2
            )
        )
    else:
        print(
            "\n\n".join(
                (f"worker {w}\n" if w is not None else "") + status.table(d) for w, d in docs
            )
        )
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    from gateway.identity import pki

    root_key = Path(args.root_key) if args.root_key else None
    made = pki.init(Path(args.dir), root_key=root_key, gateway_id=args.gateway_id)
    print(f"DEVELOPMENT PKI created in {made.root}: for development and tests, not production")
    print(f"  trust root for the hub side: {made.root_cert}")
    print(f"  sealing keyring:             {made.keyring}")
    print(f"  gateway identity:            {made.gateway_cert} (CN {args.gateway_id}: audit log)")
    if made.passphrase_file.exists():
        print(f"  key passphrase (0600):       {made.passphrase_file} (beside the keys it unlocks)")
    if root_key is not None:
        print(f"  root key (0600, encrypted):  {root_key}")
    else:
        print("  root key:                    not kept (pass --root-key PATH to keep it elsewhere)")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from gateway.identity import pki

    renewed = set(pki.existing(Path(args.dir), args.device_ids))
    role = args.modbus_role
    issued = pki.issue(
        Path(args.dir), args.device_ids, days=args.days, renew=args.renew, modbus_role=role
    )
    for device_id in issued:
        p = pki.Pki(Path(args.dir))
        what = "renewed (new key: re-register a thumbprint) " if device_id in renewed else ""
        carries = f" (Modbus role {role!r})" if role is not None else ""
        print(f"{device_id}: {what}{p.device_cert(device_id)} {p.device_key(device_id)}{carries}")
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    from gateway.open_cli import open_record

    return open_record(
        Path(args.record),
        pki_dir=Path(args.pki) if args.pki else None,
        keyring_path=Path(args.keyring) if args.keyring else None,
        as_json=args.json,
        summary=args.summary,
    )


def _store_paths(args: argparse.Namespace) -> list[Path]:
    """The store file given, or every store a config's gateway keeps (one per worker)."""
    if args.path:
        return [Path(args.path)]
    from gateway import config as config_mod
    from gateway.store.paths import stores_left

    return stores_left(config_mod.load(args.config, check_files=False))


def cmd_store_status(args: argparse.Namespace) -> int:
    import json

    from gateway import store

    reports = [store.status(path) for path in _store_paths(args)]
    if args.json:
        print(json.dumps(reports[0] if args.path else reports, indent=2))
        return 0
    for report in reports:
        print(
            f"{report['path']}: boot {report['boot_id']}, {report['envelopes']} envelopes, "
            f"{report['bytes']} bytes"
        )
        for device, row in report["devices"].items():
            dropped = row.get("dropped")
            age = row.get("oldest_age_s")
            print(
                f"  {device}: {row.get('envelopes', 0)} envelopes, {row.get('bytes', 0)} "
                f"bytes, oldest {'-' if age is None else f'{age} s'}, next seq "
                f"{row.get('next_seq', 0)}"
                + (
                    f", dropped {dropped['envelopes']} envelopes / {dropped['readings']} readings"
                    if dropped
                    else ""
                )
            )
    return 0


def _sequence_marks(args: argparse.Namespace) -> SeqMarks | None:
    """With --config and its passphrase at hand: the keys that authenticate sequence marks."""
    if not args.config:
        return None
    from gateway import config as config_mod
    from gateway.identity import keyring
    from gateway.store import SeqMarks

    try:
        cfg = config_mod.load(args.config, check_files=False)
        ring = keyring.load(cfg.sealing.keyring, cfg.secrets.passphrase())
    except (FieldgateError, OSError) as err:
        print(f"sequence marks not authenticated (no keyring: {err})", file=sys.stderr)
        return None
    return SeqMarks.from_sealing(cfg.sealing.key_id, ring.keys)


def cmd_store_verify(args: argparse.Namespace) -> int:
    from gateway import store

    marks = _sequence_marks(args)
    failed = False
    for path in _store_paths(args):
        problems = store.verify(path, marks)
        for line in problems:
            print(f"{path}: {line}", file=sys.stderr)
        print(f"{path}: {'sound' if not problems else f'{len(problems)} problems'}")
        failed = failed or bool(problems)
    return EXIT_FAILED if failed else 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldgate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="run the gateway from a config file")
    run.add_argument(
        "--config",
        help="gateway TOML file (without it, as an IoT Edge module when IOTEDGE_* are set)",
    )
    run.add_argument(
        "--workers", type=int, default=1, help="processes over disjoint device sets (one core each)"
    )
    run.add_argument("--worker", help=argparse.SUPPRESS)  # I/W: set by --workers
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line (ts, level, logger, msg, device, kind)",
    )
    run.set_defaults(func=cmd_run)

    reload = verbs.add_parser(
        "reload",
        help="validate a config file, then have the gateway running from it apply it (SIGHUP)",
    )
    reload.add_argument("--config", required=True, help="the running gateway's TOML file")
    reload.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the outcome"
    )
    reload.add_argument("--json", action="store_true", help="print the outcome as JSON")
    reload.set_defaults(func=cmd_reload)

    edge = verbs.add_parser("edge", help="Azure IoT Edge module mode").add_subparsers(
        dest="edge_verb", required=True
    )
    edge_run = edge.add_parser(
        "run", help="run as an IoT Edge module: config from the module twin (IOTEDGE_* set)"
    )
    edge_run.add_argument(
        "--trust-file",
        metavar="PATH",
        help="where the workload API's trust bundle is written for the devices' sessions "
        "(default: $FIELDGATE_EDGE_TRUST_FILE, else $TMPDIR/fieldgate-edge/edgehub-roots.pem)",
    )
    edge_run.add_argument(
        "--report-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between reported-property patches, at least (default 1)",
    )
    edge_run.set_defaults(func=cmd_edge_run)

    status = verbs.add_parser(
        "status", help="ask the running gateway: devices, links, sessions, store, audit"
    )
    status.add_argument("--config", required=True, help="the gateway's TOML file")
    status.add_argument("--json", action="store_true", help="print the document as JSON")
    status.set_defaults(func=cmd_status)

    pki = verbs.add_parser("pki", help="development PKI").add_subparsers(
        dest="pki_verb", required=True
    )
    init = pki.add_parser(
        "init", help="create a root, an intermediate, hub certificates and a sealing keyring"
    )
    init.add_argument("--dir", default="fieldgate-state/pki")
    init.add_argument(
        "--root-key",
        metavar="PATH",
        help="keep the root's key here, outside --dir (default: not kept)",
    )
    init.add_argument(
        "--gateway-id",
        default="fieldgate",
        help="the gateway's own IoT Hub device id (CN of gateway.pem; the audit chain's id)",
    )
    init.set_defaults(func=cmd_pki_init)
    issue = pki.add_parser("issue", help="issue device certificates (CN = device id)")
    issue.add_argument("--dir", default="fieldgate-state/pki")
    issue.add_argument("--days", type=int, default=365)
    issue.add_argument(
        "--renew", action="store_true", help="replace the certificate and key of existing ids"
    )
    issue.add_argument(
        "--modbus-role",
        metavar="ROLE",
        help="add the Modbus/TCP Security role extension (OID 1.3.6.1.4.1.50316.802.1): "
        "the gateway's client certificate for TLS links to devices (port 802)",
    )
    issue.add_argument("device_ids", nargs="+")
    issue.set_defaults(func=cmd_pki_issue)

    from gateway.enroll import add_parser as add_enroll

    add_enroll(verbs)

    from gateway.audit.cli import add_parser as add_audit

    add_audit(verbs)

    store = verbs.add_parser("store", help="inspect the durable store").add_subparsers(
        dest="store_verb", required=True
    )
    for name, func, text in (
        ("status", cmd_store_status, "depth per device, bytes, oldest age, drops"),
        ("verify", cmd_store_verify, "integrity check and envelope header sanity"),
    ):
        sub = store.add_parser(name, help=text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the gateway config (its store)")
        where.add_argument("--path", help="a store file")
        if name == "status":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)

    opener = verbs.add_parser("open", help="open recorded envelopes and print the readings")
    opener.add_argument("record", help="a JSON-lines record written by `fieldgate localhub`")
    opener.add_argument("--pki", help="PKI folder holding keyring.json (and its passphrase)")
    opener.add_argument("--keyring", help="keyring file (passphrase from FIELDGATE_KEY_PASSPHRASE)")
    opener.add_argument("--json", action="store_true", help="one JSON reading per line")
    opener.add_argument(
        "--summary",
        action="store_true",
        help="no readings: one line per device (readings, duplicates, gaps, boots) and the "
        "total, on stdout",
    )
    opener.set_defaults(func=cmd_open)
    _add_plugin_verbs(verbs)
    return parser


VERB_PLUGINS = "fieldgate.verbs"


def _add_plugin_verbs(verbs: Any) -> None:
    """Verbs other distributions register under the ``fieldgate.verbs`` entry-point group
    (the test tools: demo, loadtest, localhub, simulate). The product never imports them: an
    install without them simply lacks those verbs. A plug-in whose module is not installed
    (a stale entry point) is skipped; any other error in one is a bug and is raised."""
    for plugin in entry_points(group=VERB_PLUGINS):
        try:
            add_verbs = plugin.load()
        except ModuleNotFoundError:
            continue
        add_verbs(verbs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(
        args.log_level, getattr(args, "worker", None), getattr(args, "log_format", "text")
    )
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"fieldgate: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except FieldgateError as err:
        print(f"fieldgate: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        # A second stop signal: stopped at once, without waiting for the flush.
        print("fieldgate: stopped without finishing (second signal)", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `fieldgate open ... | head`: the reader left; that is not a failure.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
