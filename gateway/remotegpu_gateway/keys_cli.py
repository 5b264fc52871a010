"""`remotegpu keys create|list|rotate|revoke|webhook-secret`: API keys straight in the database."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from remotegpu_base import config

from remotegpu_gateway.store import NotFoundError, Store


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "-"


def open_store(args: argparse.Namespace) -> Store:
    data = config.data_dir(getattr(args, "data_dir", None))
    store = Store(config.database_url(getattr(args, "database_url", None), data))
    store.migrate()
    return store


def run(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        cmd = args.keys_command
        if cmd == "create":
            scopes = args.scope or ["inference"]
            key, secret = store.create_key(args.name, scopes)
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
