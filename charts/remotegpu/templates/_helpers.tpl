{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "remotegpu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release already names it. */}}
{{- define "remotegpu.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: fullname-component (component names are short). */}}
{{- define "remotegpu.componentName" -}}
{{- printf "%s-%s" (include "remotegpu.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{/* Chart label value. */}}
{{- define "remotegpu.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels (app.kubernetes.io/*). */}}
{{- define "remotegpu.labels" -}}
helm.sh/chart: {{ include "remotegpu.chart" . }}
{{ include "remotegpu.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: remotegpu
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels. */}}
{{- define "remotegpu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "remotegpu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "remotegpu.componentLabels" -}}
{{ include "remotegpu.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one component. */}}
{{- define "remotegpu.componentSelectorLabels" -}}
{{ include "remotegpu.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of the worker pods the operator creates (operator/remotegpu_operator/deployment.py). */}}
{{- define "remotegpu.workerSelectorLabels" -}}
app.kubernetes.io/name: remotegpu-worker
app.kubernetes.io/managed-by: remotegpu-operator
{{- end }}

{{- define "remotegpu.gateway.fullname" -}}
{{ include "remotegpu.componentName" (dict "root" . "component" "gateway") }}
{{- end }}

{{- define "remotegpu.operator.fullname" -}}
{{ include "remotegpu.componentName" (dict "root" . "component" "operator") }}
{{- end }}

{{- define "remotegpu.postgresql.fullname" -}}
{{ include "remotegpu.componentName" (dict "root" . "component" "postgresql") }}
{{- end }}

{{/* ServiceAccount names. */}}
{{- define "remotegpu.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "remotegpu.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "remotegpu.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "remotegpu.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's leader-election Lease (its Role may touch only this one). */}}
{{- define "remotegpu.operator.leaseName" -}}
{{ include "remotegpu.operator.fullname" . }}
{{- end }}

{{/* Images: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "remotegpu.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "remotegpu.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) }}
{{- end }}

{{- define "remotegpu.postgresql.image" -}}
{{- printf "%s:%s" .Values.postgresql.image.repository .Values.postgresql.image.tag }}
{{- end }}

{{/* Secrets: the worker token (name and key). */}}
{{- define "remotegpu.workerToken.secretName" -}}
{{- if .Values.workerToken.existingSecret }}
{{- .Values.workerToken.existingSecret }}
{{- else }}
{{- include "remotegpu.componentName" (dict "root" . "component" "worker-token") }}
{{- end }}
{{- end }}

{{- define "remotegpu.workerToken.secretKey" -}}
{{- if .Values.workerToken.existingSecret }}{{ .Values.workerToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* Secrets: the bundled PostgreSQL's password (name and key). */}}
{{- define "remotegpu.postgresql.secretName" -}}
{{- if .Values.postgresql.auth.existingSecret }}
{{- .Values.postgresql.auth.existingSecret }}
{{- else }}
{{- include "remotegpu.postgresql.fullname" . }}
{{- end }}
{{- end }}

{{- define "remotegpu.postgresql.secretKey" -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{/* Secrets: the database URL (name and key). */}}
{{- define "remotegpu.database.secretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- include "remotegpu.componentName" (dict "root" . "component" "database") }}
{{- end }}
{{- end }}

{{- define "remotegpu.database.secretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The gateway's in-cluster URL: what the operator and the workers call. */}}
{{- define "remotegpu.gateway.internalUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "remotegpu.gateway.fullname" .) .Release.Namespace (int .Values.gateway.service.port) }}
{{- end }}

{{/* The result volume's claim name. */}}
{{- define "remotegpu.results.claimName" -}}
{{- default (include "remotegpu.componentName" (dict "root" . "component" "results")) .Values.results.persistence.existingClaim }}
{{- end }}

{{/* Checks that the database settings name exactly one source. */}}
{{- define "remotegpu.database.validate" -}}
{{- $sources := 0 }}
{{- if .Values.database.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.database.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.postgresql.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "set exactly one database: database.url, database.existingSecret, or postgresql.enabled=true (the bundled single-instance PostgreSQL)" }}
{{- end }}
{{- end }}

{{/* The public base URL for result_url: gateway.publicUrl, else the Ingress' first host. */}}
{{- define "remotegpu.publicUrl" -}}
{{- if .Values.gateway.publicUrl }}
{{- .Values.gateway.publicUrl | trimSuffix "/" }}
{{- else if and .Values.gateway.ingress.enabled .Values.gateway.ingress.hosts }}
{{- $h := index .Values.gateway.ingress.hosts 0 }}
{{- if $h.host }}
{{- printf "http%s://%s" (ternary "s" "" (not (empty .Values.gateway.ingress.tls))) $h.host }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the chart's hook Jobs run: with the operator (same image, same placement). */}}
{{- define "remotegpu.hookPlacement" -}}
{{- with .Values.operator.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.operator.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.operator.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* An alert's labels: its severity (metrics.prometheusRule.severities), then the additional
labels, which win on the same key (one `severity`, never two). (dict "r" $rule "alert" NAME) */}}
{{- define "remotegpu.alertLabels" -}}
{{- $labels := merge (deepCopy (default dict .r.additionalAlertLabels)) (dict "severity" (index .r.severities .alert)) }}
{{- toYaml $labels }}
{{- end }}

{{/* Whether results live on a local volume (not object storage) and which: "" (object
storage), "emptyDir", "shared" (ReadWriteMany claim) or "single" (a ReadWriteOnce claim:
one gateway pod, replaced rather than rolled). */}}
{{- define "remotegpu.results.volume" -}}
{{- $p := .Values.results.persistence }}
{{- if .Values.objectStorage.enabled }}
{{- else if not $p.enabled }}emptyDir
{{- else if has "ReadWriteMany" $p.accessModes }}shared
{{- else }}single
{{- end }}
{{- end }}

{{/* Gateway replicas: the value, else 2 with object storage (highly available) and 1 without. */}}
{{- define "remotegpu.gateway.replicas" -}}
{{- if .Values.gateway.replicaCount }}{{ .Values.gateway.replicaCount }}
{{- else if .Values.objectStorage.enabled }}2
{{- else }}1
{{- end }}
{{- end }}

{{/* Checks that several gateways share their images (object storage or a ReadWriteMany volume). */}}
{{- define "remotegpu.gateway.validate" -}}
{{- $volume := include "remotegpu.results.volume" . }}
{{- $several := or (gt (int (include "remotegpu.gateway.replicas" .)) 1) .Values.gateway.autoscaling.enabled }}
{{- if and $several (or (eq $volume "single") (eq $volume "emptyDir")) }}
{{- fail "more than one gateway replica (gateway.replicaCount > 1 or gateway.autoscaling.enabled) needs shared images: objectStorage.enabled=true (recommended) or a ReadWriteMany result volume (results.persistence.accessModes)" }}
{{- end }}
{{- if and .Values.objectStorage.enabled (not .Values.objectStorage.bucket) }}
{{- fail "objectStorage.enabled=true needs objectStorage.bucket (an existing bucket)" }}
{{- end }}
{{- end }}
