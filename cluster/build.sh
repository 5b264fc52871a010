#!/usr/bin/env bash
# Builds the local cluster (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm, and for the real nodes kubelet, kube-proxy and
# CoreDNS) from their Go modules into a cache outside the repository, once per
# version set. Prints the bin folder as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${REMOTEGPU_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remotegpu/cluster}
bin="$cache/bin-$KUBE_VERSION-$ETCD_VERSION-$KWOK_VERSION-$HELM_VERSION"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kubelet kube-proxy coredns-$COREDNS_VERSION weed-$SEAWEEDFS_VERSION)
missing=()
for b in "${want[@]}"; do [ -x "$bin/$b" ] || missing+=("$b"); done
# A helm built without the release's version ldflags reports no version and assumes
# Kubernetes v1.20, so `helm template`/`helm lint` fail the chart's kubeVersion: rebuild it.
if [ -x "$bin/helm" ] && [ "$("$bin/helm" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]; then
  missing+=(helm)
fi
stages=(node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete)
[ -f "$bin/stages/pod-delete.yaml" ] || missing+=(stages)
if [ ${#missing[@]} -eq 0 ]; then echo "$bin"; exit 0; fi

mkdir -p "$bin" "$cache/work"
export GOFLAGS=-mod=mod CGO_ENABLED=0
step() { echo "[cluster-build] $(date +%T) $*" >&2; }

need() { [[ " ${missing[*]} " == *" $1 "* ]]; }

kube_cmds=()
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  need "$c" && kube_cmds+=("k8s.io/kubernetes/cmd/$c")
done
if [ ${#kube_cmds[@]} -gt 0 ]; then
  step "building Kubernetes $KUBE_VERSION (${kube_cmds[*]##*/}); several minutes per binary on 2 cores"
  w="$cache/work/kube-$KUBE_VERSION"; mkdir -p "$w"
  gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module remotegpu.local/kube"
    grep -E '^go ' "$gomod"
    grep -E '^godebug ' "$gomod" || true
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    minor=${KUBE_VERSION#v1.}
    # Every staging module k8s.io/X => ./staging/... becomes its published v0.X.Y.
    grep -E '=> \./staging/' "$gomod" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
  } > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  minor_num=$(echo "$KUBE_VERSION" | cut -d. -f2)
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor_num -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$w" && go build -trimpath -ldflags "$ld" -o "$bin/" "${kube_cmds[@]}")
fi

if need etcd; then
  step "building etcd $ETCD_VERSION"
  w="$cache/work/etcd-$ETCD_VERSION"; mkdir -p "$w"
  printf 'module remotegpu.local/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$w" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
fi

if need kwok; then
  step "building kwok $KWOK_VERSION"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if need helm; then
  step "building helm $HELM_VERSION"
  # The ldflags of helm's own Makefile: its version, and the Kubernetes version it
  # assumes without a cluster (that of the client-go it is built with, as released).
  helm_mod=$(cd "$cache/work" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  client_go=$(awk '$1 == "k8s.io/client-go" {print $2}' "$helm_mod")
  kube_minor=$(echo "$client_go" | cut -d. -f2)
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld="$ld -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$kube_minor"
  done
  # Built aside, then renamed over the old one: a helm running meanwhile is not disturbed.
  GOBIN="$cache/work/helm-$HELM_VERSION" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv -f "$cache/work/helm-$HELM_VERSION/helm" "$bin/helm"
fi
if need "coredns-$COREDNS_VERSION"; then
  # Cluster DNS for the real nodes (cluster.local): CoreDNS with only the plugins the
  # Corefile uses (the full build compiles every cloud provider's SDK); versioned name,
  # so a new pin rebuilds.
  step "building CoreDNS $COREDNS_VERSION (bind, errors, log, cache, kubernetes)"
  w="$cache/work/coredns-$COREDNS_VERSION"; mkdir -p "$w"
  printf 'module remotegpu.local/coredns\n\ngo 1.25.0\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > "$w/go.mod"
  cat > "$w/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// In CoreDNS's own plugin.cfg order (the order a query goes through them).
func init() { dnsserver.Directives = []string{"bind", "errors", "log", "cache", "kubernetes"} }

func main() { coremain.Run() }
GO
  (cd "$w" && go mod tidy >/dev/null 2>&1 || true
   cd "$w" && go build -trimpath -ldflags "-s -w" -o "$bin/coredns-$COREDNS_VERSION" .)
fi
if need "weed-$SEAWEEDFS_VERSION"; then
  # SeaweedFS's `weed` (the tests' S3-compatible store). Its go.mod replaces one module,
  # which `go install pkg@version` refuses: a small module requires it and copies the replace.
  step "building SeaweedFS $SEAWEEDFS_VERSION (weed); several minutes on 2 cores"
  w="$cache/work/seaweedfs-$SEAWEEDFS_VERSION"; mkdir -p "$w"
  gomod=$(cd "$w" && go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module remotegpu.local/seaweedfs"
    grep -E '^go ' "$gomod"
    echo "require github.com/seaweedfs/seaweedfs $SEAWEEDFS_VERSION"
    grep -E '^replace .* => [^.]' "$gomod" || true
  } > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/seaweedfs/seaweedfs/weed"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$w" && go build -trimpath -ldflags "-s -w" -o "$bin/weed-$SEAWEEDFS_VERSION" github.com/seaweedfs/seaweedfs/weed)
fi
if need stages; then
  # KWOK's own Stage definitions, from its module source (the launcher adds a ready delay).
  src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  [ -d "$src" ] || (cd "$cache/work" && GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  mkdir -p "$bin/stages"
  for s in "${stages[@]}"; do cp "$src/$s.yaml" "$bin/stages/"; done
  chmod -R u+w "$bin/stages"
fi
for b in "${want[@]}"; do [ -x "$bin/$b" ] || { echo "cluster build: $b is missing from $bin; see the errors above" >&2; exit 1; }; done
step "done"
echo "$bin"
