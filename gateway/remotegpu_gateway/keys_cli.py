"""`remotegpu keys create|list|rotate|revoke|update|usage|webhook-secret`: API keys, their
limits and usage, straight in the database."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from remotegpu_base import config

from remotegpu_gateway.limits import LIMIT_FIELDS, KeyLimits, Limits
from remotegpu_gateway.metrics import Metrics
from remotegpu_gateway.settings import key_limit_defaults
from remotegpu_gateway.store import KeyRecord, NotFoundError, Store
from remotegpu_gateway.usage import Usage


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "-"


def open_store(args: argparse.Namespace) -> Store:
    data = config.data_dir(getattr(args, "data_dir", None))
    store = Store(config.database_url(getattr(args, "database_url", None), data))
    store.migrate()
    return store


def find_key(store: Store, ref: str) -> KeyRecord:
    """A key by id, else by name (which must then name one key that is not revoked)."""
    try:
        return store.get_key(ref)
    except NotFoundError:
        pass
    named = [k for k in store.list_keys() if k.name == ref and k.revoked_at is None]
    if len(named) > 1:
        raise ValueError(
            f"{len(named)} keys are named {ref!r} ({', '.join(k.id for k in named)}); use the id"
        )
    if not named:
        raise NotFoundError(f"{ref} (no key has this id or name; `remotegpu keys list` shows them)")
    return named[0]


def limit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given: a number (0: unlimited) or None for `default`."""
    return {f: getattr(args, f) for f in LIMIT_FIELDS if hasattr(args, f)}


def print_limits(limits: Limits, key: KeyRecord) -> None:
    own = limits.overrides(key.id)
    print(f"limits of key {key.id} ({key.name}); 0: unlimited")
    for f in LIMIT_FIELDS:
        value = own[f]
        default = getattr(limits.defaults, f)
        shown = (
            f"{value:g}"
            if value is not None
            else f"default ({default:g} here; the gateway's setting applies)"
        )
        print(f"  {f.replace('_', '-'):<22} {shown}")


def print_usage(report: dict[str, Any], key: KeyRecord) -> None:
    entry = report["keys"][0] if report["keys"] else Usage.empty(key.id)
    t = entry["total"]
    span = f"{report['since'] or 'start'} .. {report['until'] or 'today'}"
    print(f"usage of key {key.id} ({key.name}), UTC days {span}; GPU-seconds are the jobs' run time")
    print(f"{'DAY':<11} {'MODEL':<40} {'JOBS':>6} {'OK':>6} {'FAILED':>6} {'CANCEL':>6} {'GPU-S':>10}")
    for d in entry["by_day"]:
        print(
            f"{d['day']:<11} {d['model'][:40]:<40} {d['jobs']:>6} {d['succeeded']:>6} {d['failed']:>6} "
            f"{d['cancelled']:>6} {d['gpu_seconds']:>10.1f}"
        )
    print(
        f"{'total':<11} {'':<40} {t['jobs']:>6} {t['succeeded']:>6} {t['failed']:>6} {t['cancelled']:>6} "
        f"{t['gpu_seconds']:>10.1f}"
    )


def run(args: argparse.Namespace) -> int:
    store = open_store(args)
    usage = Usage(store, Metrics())
    limits = Limits(
        store, usage, KeyLimits(**{k.removeprefix("key_"): v for k, v in key_limit_defaults().items()})
    )
    try:
        cmd = args.keys_command
        if cmd == "create":
            scopes = args.scope or ["inference"]
            name = args.name or args.name_arg
            if not name:
                raise ValueError("name the key: remotegpu keys create NAME (or --name NAME)")
            Limits.validate(limit_values(args))  # before the key exists
            key, secret = store.create_key(name, scopes)
            if limit_values(args):
                limits.set(key.id, limit_values(args))
            print(f"created key {key.id} ({key.name}) with scopes {','.join(key.scopes)}")
            print("the secret below is shown once; store it now:")
            print(secret)
        elif cmd == "list":
            print(f"{'ID':<22} {'NAME':<24} {'SCOPES':<18} {'CREATED':<21} {'LAST USED':<21} STATE")
            for k in store.list_keys():
                state = "revoked" if k.revoked_at else "active"
                print(
                    f"{k.id:<22} {k.name[:24]:<24} {','.join(k.scopes):<18} "
                    f"{_when(k.created_at):<21} {_when(k.last_used_at):<21} {state}"
                )
        elif cmd == "rotate":
            secret = store.rotate_key(args.id, args.grace_seconds)
            grace = f"stays valid for {args.grace_seconds} s" if args.grace_seconds else "is revoked now"
            print(f"rotated key {args.id}; the old secret {grace}")
            print("the new secret below is shown once; store it now:")
            print(secret)
        elif cmd == "webhook-secret":
            key_id = _key_id(store, args.key)
            secret = store.set_webhook_secret(key_id)
            print(f"webhook secret of key {key_id} set; it signs the webhooks of this key's jobs")
            print("the secret below is shown once; give it to your webhook receiver:")
            print(secret)
        elif cmd == "revoke":
            store.revoke_key(args.id)
            print(f"revoked key {args.id}")
        elif cmd == "update":
            key = find_key(store, args.key)
            if limit_values(args):
                limits.set(key.id, limit_values(args))
            print_limits(limits, key)
        elif cmd == "usage":
            key = find_key(store, args.key)
            report = usage.report(key.id, args.since, args.until)
            if args.json:
                print(json.dumps(report["keys"][0] if report["keys"] else Usage.empty(key.id), indent=2))
            else:
                print_usage(report, key)
        return 0
    except NotFoundError as e:
        print(f"error: no key {e}")
        return 1
    except ValueError as e:
        print(f"error: {e}")
        return 1
    finally:
        store.close()


def _key_id(store: Store, name_or_id: str) -> str:
    """A key's id from its id or its (unique, not revoked) name."""
    keys = store.list_keys()
    if any(k.id == name_or_id for k in keys):
        return name_or_id
    named = [k for k in keys if k.name == name_or_id and k.revoked_at is None]
    if len(named) > 1:
        raise ValueError(
            f"{len(named)} keys are named {name_or_id!r}; pass the key's id (remotegpu keys list)"
        )
    if not named:
        raise NotFoundError(name_or_id)
    return named[0].id
