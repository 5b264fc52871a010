"""`remotegpu chart-hook ACTION`: what the Helm chart's hook Jobs run, in the release's image.

- `secrets`: creates the Secrets the values neither give nor name (the worker token, the
  bundled PostgreSQL's password), once; an existing one keeps its value.
- `crd-upgrade`: replaces the ImageModel CRD with the chart's (`helm upgrade` leaves CRDs
  alone).
- `uninstall`: deletes the release's ImageModels and waits for the operator to release them,
  so no worker Deployment outlives the release.

Each runs as the hook's own ServiceAccount, whose Role allows exactly these calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from typing import Any

from kr8s.asyncio.objects import CustomResourceDefinition, Secret
from remotegpu_base import kube

# Helm deletes what a release rendered; these were not rendered, and must outlive upgrades
# and uninstalls (the database's retained volume opens only with its password).
KEEP = {"helm.sh/resource-policy": "keep"}


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{what} {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


async def generate_secrets(
    api: kube.Api, namespace: str, wanted: dict[str, str], labels: dict[str, str]
) -> None:
    """Creates each Secret (name -> data key) with a random value, unless it exists."""
    for name, key in wanted.items():
        secret = Secret(
            {
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": KEEP},
                "type": "Opaque",
                "stringData": {key: secrets.token_hex(24)},
            },
            api=api,
        )
        try:
            await secret.create()
            print(f"generated Secret {name}")
        except kube.ServerError as e:
            if kube.status_of(e) != 409:
                raise
            await secret.patch({"metadata": {"annotations": KEEP}})  # only the annotation: the value stays
            print(f"kept Secret {name}")


async def upgrade_crd(api: kube.Api, crd: dict[str, Any]) -> None:
    """Replaces the CRD's spec with `crd`'s, keeping the labels and annotations others put on it."""
    name = crd["metadata"]["name"]
    # By name: the hook's role may get and update this one CRD, not list them.
    current = await kube.get(api, CustomResourceDefinition, None, name)
    if current is None:
        raise SystemExit(f"CustomResourceDefinition {name} is not installed: `kubectl apply -f crds/` first")
    meta = current["metadata"]
    for field in ("labels", "annotations"):
        crd["metadata"][field] = {**meta.get(field, {}), **crd["metadata"].get(field, {})}
    crd["metadata"]["resourceVersion"] = meta["resourceVersion"]
    # A replace (PUT), not a merge patch: fields the new CRD drops must go.
    await kube.replace(api, CustomResourceDefinition, crd)
    print(f"updated CustomResourceDefinition {name}")


async def delete_imagemodels(api: kube.Api, namespace: str, selector: str, timeout: float) -> None:
    """Deletes the selected ImageModels and waits until the operator has let them go."""

    async def names() -> list[str]:
        listed = await kube.list_of(api, kube.ImageModelObject, namespace, labelSelector=selector)
        return [m["metadata"]["name"] for m in listed["items"]]

    todo = await names()
    for name in todo:
        try:
            await kube.ImageModelObject(name, namespace=namespace, api=api).delete()
        except kube.NotFoundError:
            pass
    deadline = time.monotonic() + timeout
    while (left := await names()) and time.monotonic() < deadline:
        await asyncio.sleep(2)
    if left:
        raise SystemExit(
            f"ImageModels still present after {timeout:.0f} s (is the operator running?): {left}"
        )
    print(f"deleted {len(todo)} ImageModel(s): {todo}")


async def _run(args: argparse.Namespace) -> None:
    # The arguments are checked before any call: a bad render fails without touching the cluster.
    if args.hook_command == "secrets":
        wanted, labels = _pairs(args.secret or [], "--secret"), _pairs(args.label or [], "--label")
        await generate_secrets(await kube.connect(args.kubeconfig), args.namespace, wanted, labels)
    elif args.hook_command == "crd-upgrade":
        crd = args.crd or os.environ.get("CRD")
        if not crd:
            raise SystemExit("crd-upgrade: give the CRD as JSON in --crd or $CRD")
        await upgrade_crd(await kube.connect(args.kubeconfig), json.loads(crd))
    else:
        api = await kube.connect(args.kubeconfig)
        await delete_imagemodels(api, args.namespace, args.selector, args.timeout_seconds)


def command(args: argparse.Namespace) -> int:
    asyncio.run(_run(args))
    sys.stdout.flush()
    return 0
