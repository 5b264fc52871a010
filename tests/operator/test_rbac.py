"""operator/rbac.yaml stays least-privilege (the cluster tests run the operator under exactly these rules)."""

from __future__ import annotations

import yaml

from tests.fixtures.cluster import REPO


def rules() -> list[dict]:
    docs = list(yaml.safe_load_all((REPO / "operator/rbac.yaml").read_text()))
    return [r for d in docs for r in d["rules"]]


def test_no_wildcards_and_no_deletes_but_the_prewarm_daemonsets():
    for r in rules():
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"], r
        assert "deletecollection" not in r["verbs"], r
        if "delete" in r["verbs"]:  # a switched-off pre-warm DaemonSet, deleted by its uid
            assert r["apiGroups"] == ["apps"] and r["resources"] == ["daemonsets"], r


def test_no_secrets_and_no_cluster_objects():
    resources = {res for r in rules() for res in r["resources"]}
    assert not resources & {"secrets", "nodes", "namespaces", "customresourcedefinitions", "clusterroles"}


def test_lease_updates_are_limited_to_the_operator_lease():
    for r in rules():
        if "leases" in r["resources"] and set(r["verbs"]) & {"get", "update", "patch"}:
            assert r.get("resourceNames") == ["remotegpu-operator"], r
