#!/usr/bin/env bash
# Builds the local cluster (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm, and for the real nodes kubelet, kube-proxy and
# CoreDNS) and the tests' Prometheus and promtool from their Go modules into a cache
# outside the repository, once per version set. Prints the bin folder as its last
# line; progress (packages compiled, every 30 s) and each step's time go to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${REMOTEGPU_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remotegpu/cluster}
bin="$cache/bin-$KUBE_VERSION-$ETCD_VERSION-$KWOK_VERSION-$HELM_VERSION"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kubelet kube-proxy
  "coredns-$COREDNS_VERSION" "prometheus-$PROMETHEUS_VERSION" "promtool-$PROMETHEUS_VERSION"
  "weed-$SEAWEEDFS_VERSION")
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
started=$SECONDS
took() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# Reads `go build -v`/`go install -v` output (a package path per line, as each is
# compiled) and prints a progress line every 30 s; anything else (errors) goes through.
progress() {  # progress LABEL TOTAL
  local n=0 fetched=0 last=$SECONDS line
  while IFS= read -r line; do
    if [[ $line == "go: downloading "* ]]; then fetched=$((fetched + 1))
    elif [[ $line =~ ^[A-Za-z0-9._/~-]+$ ]]; then n=$((n + 1))
    else echo "$line" >&2
    fi
    if ((SECONDS - last >= 30)); then
      step "  $1: $n of ${2:-?} packages compiled$( ((fetched)) && echo ", $fetched modules downloaded")"
      last=$SECONDS
    fi
  done
}

# go build in a wrapper module, with progress: gobuild LABEL DIR TAGS LDFLAGS OUT PKG...
gobuild() {
  local label=$1 dir=$2 tags=$3 ld=$4 out=$5 t=$SECONDS total
  shift 5
  total=$(cd "$dir" && go list -tags "$tags" -deps "$@" 2>/dev/null | wc -l) || total=
  (cd "$dir" && go build -v -trimpath -tags "$tags" -ldflags "$ld" -o "$out" "$@") 2>&1 | progress "$label" "$total"
  step "  $label built in $(took $t)"
}

# go install of a module's command at a version (its go.mod has no replace lines), with
# progress; built aside, then renamed over the old one, so a copy running meanwhile (or
# a concurrent build.sh) never sees half a file.
goinstall() {  # goinstall LABEL PKG@VERSION [LDFLAGS]
  local t=$SECONDS out
  out=$(mktemp -d "$cache/work/.$1.XXXXXX")
  GOBIN="$out" go install -v -trimpath -ldflags "${3:--s -w}" "$2" 2>&1 | progress "$1" ""
  mv -f "$out"/* "$bin/" && rmdir "$out"
  step "  $1 built in $(took $t)"
}

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
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true)
  gobuild kubernetes "$w" "" "$ld" "$bin/" "${kube_cmds[@]}"
fi

if need etcd; then
  step "building etcd $ETCD_VERSION"
  w="$cache/work/etcd-$ETCD_VERSION"; mkdir -p "$w"
  printf 'module remotegpu.local/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true)
  gobuild etcd "$w" "" "-s -w" "$bin/etcd" go.etcd.io/etcd/server/v3
fi

if need kwok; then
  step "building kwok $KWOK_VERSION"
  goinstall kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
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
  goinstall helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$ld"
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
  (cd "$w" && go mod tidy >/dev/null 2>&1 || true)
  gobuild coredns "$w" "" "-s -w" "$bin/coredns-$COREDNS_VERSION" .
fi
if need "prometheus-$PROMETHEUS_VERSION" || need "promtool-$PROMETHEUS_VERSION"; then
  # The tests' Prometheus and promtool, with Kubernetes service discovery only
  # (remove_all_sd leaves out every cloud's SDK); no web UI assets (the API is what the
  # tests use). A wrapper module, as for Kubernetes: `go install pkg@version` refuses a
  # module whose go.mod has replace or exclude lines, as some releases' have. Versioned
  # names, so a new pin rebuilds.
  step "building Prometheus $PROMETHEUS_VERSION (prometheus, promtool; Kubernetes service discovery only)"
  w="$cache/work/prometheus-$PROMETHEUS_VERSION"; mkdir -p "$w"
  gomod=$(cd "$w" && go mod download -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  printf 'module remotegpu.local/prometheus\n\n%s\n\nrequire github.com/prometheus/prometheus %s\n' \
    "$(grep -E '^go ' "$gomod")" "$PROMETHEUS_VERSION" > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/prometheus/prometheus/cmd/prometheus"\n\t_ "github.com/prometheus/prometheus/cmd/promtool"\n)\n' > "$w/tools.go"
  p=github.com/prometheus
  version=$(cd "$w" && go list -m -f '{{.Dir}}' "$p/prometheus" | xargs -I{} cat {}/VERSION)
  out=$(mktemp -d "$bin/.prometheus.XXXXXX")  # then renamed: a concurrent build.sh sees whole files
  gobuild prometheus "$w" remove_all_sd,enable_kubernetes_sd "-s -w -X $p/common/version.Version=$version" \
    "$out/" "$p/prometheus/cmd/prometheus" "$p/prometheus/cmd/promtool"
  for c in prometheus promtool; do mv "$out/$c" "$bin/$c-$PROMETHEUS_VERSION"; done
  rmdir "$out"
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
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true)
  out=$(mktemp -d "$bin/.weed.XXXXXX")  # then renamed: a concurrent build.sh sees a whole file
  gobuild weed "$w" "" "-s -w" "$out/weed" github.com/seaweedfs/seaweedfs/weed
  mv "$out/weed" "$bin/weed-$SEAWEEDFS_VERSION" && rmdir "$out"
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
step "done in $(took "$started")"
echo "$bin"
