{{/* Object-name prefix, at most 50 characters so that "<fullname>-head-svc" and friends fit in 63. */}}
{{- define "raylane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "raylane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "raylane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods. */}}
{{- define "raylane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raylane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "raylane.labels" -}}
helm.sh/chart: {{ include "raylane.chart" . }}
{{ include "raylane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raylane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Marks every pod that is a Ray node of this release (head, workers, routers): NetworkPolicy and metrics use it. */}}
{{- define "raylane.rayNodeLabel" -}}
raylane.io/ray-node: "true"
{{- end -}}

{{- define "raylane.rayClusterName" -}}
{{- include "raylane.fullname" . -}}
{{- end -}}

{{/* KubeRay names the head Service "<cluster>-head-svc"; routers join Ray through it. */}}
{{- define "raylane.headServiceName" -}}
{{- printf "%s-head-svc" (include "raylane.rayClusterName" .) -}}
{{- end -}}

{{- define "raylane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-head" (include "raylane.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "raylane.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "raylane.gpuImage" -}}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.gpuImage.tag -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.gpuImage.repository) $tag -}}
{{- end -}}

{{/* The Secret holding the bootstrap API key, or "" when no tenant is bootstrapped. */}}
{{- define "raylane.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if .Values.apiKey.generate -}}
{{- printf "%s-api-key" (include "raylane.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the admin token: the one named, or the one the chart generates. */}}
{{- define "raylane.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "raylane.fullname" .)) .Values.adminAuth.existingSecret -}}
{{- end -}}

{{/* Redis: "<host>:<port>" and the URL (without credentials) the control plane uses. */}}
{{- define "raylane.redisServiceName" -}}
{{- printf "%s-redis" (include "raylane.fullname" .) -}}
{{- end -}}

{{- define "raylane.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "raylane.redisServiceName" .) -}}
{{- else -}}
{{- required "Redis: set redis.enabled=true (the bundled StatefulSet) or externalRedis.url=redis://host:6379/0" .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{/* host:port for Ray's GCS (it takes no database number); rediss:// keeps TLS. */}}
{{- define "raylane.redisAddress" -}}
{{- $url := urlParse (include "raylane.redisUrl" .) -}}
{{- $host := $url.host -}}
{{- if not (contains ":" $host) -}}{{- $host = printf "%s:6379" $host -}}{{- end -}}
{{- if eq $url.scheme "rediss" -}}{{- printf "rediss://%s" $host -}}{{- else -}}{{- $host -}}{{- end -}}
{{- end -}}

{{/* The Secret and key with the Redis password, as a dict; empty when Redis has no password. */}}
{{- define "raylane.redisPasswordRef" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret -}}
name: {{ .Values.redis.auth.existingSecret }}
key: {{ .Values.redis.auth.existingSecretPasswordKey }}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
name: {{ .Values.externalRedis.existingSecret }}
key: {{ .Values.externalRedis.existingSecretPasswordKey }}
{{- end -}}
{{- end -}}

{{/* Env vars giving the control plane its Redis: REDIS_PASSWORD (when set) spliced into RAYLANE_REDIS_URL. */}}
{{- define "raylane.redisEnv" -}}
{{- $ref := include "raylane.redisPasswordRef" . | fromYaml -}}
{{- $url := urlParse (include "raylane.redisUrl" .) -}}
{{- if $ref }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
- name: RAYLANE_REDIS_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s%s" $url.scheme $url.host $url.path | quote }}
{{- else }}
- name: RAYLANE_REDIS_URL
  value: {{ include "raylane.redisUrl" . | quote }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts every raylane container needs for a read-only root filesystem, plus model storage. */}}
{{- define "raylane.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- with .root.Values.modelStorage }}
{{- if .enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.existingClaim: name the PVC holding the models when modelStorage.enabled is true" .existingClaim }}
    readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "raylane.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- with .Values.modelStorage }}
{{- if .enabled }}
- name: models
  mountPath: {{ .mountPath }}
  readOnly: true
  {{- with .subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Env shared by every raylane container: writable HOME and caches under /tmp (the root filesystem is read-only). */}}
{{- define "raylane.commonEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/cache/triton
- name: RAYLANE_STATE_DIR
  value: /tmp/raylane
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end -}}

{{/* Where Prometheus scrapes a router's raylane metrics: `/metrics` on the HTTP port when that speaks plain HTTP,
else the router's own metrics port (`--metrics-port`), which never speaks TLS. "true" or "". */}}
{{- define "raylane.routerMetricsOnHttp" -}}
{{- if and .Values.router.http.enabled (not .Values.tls.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "raylane.routerMetricsPort" -}}
{{- if include "raylane.routerMetricsOnHttp" . -}}{{ .Values.router.http.port }}{{- else -}}{{ .Values.router.metricsPort }}{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", the fullname cut so the whole stays a valid Service name (63 characters). */}}
{{- define "raylane.serviceName" -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "raylane.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}
