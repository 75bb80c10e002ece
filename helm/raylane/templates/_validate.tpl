{{/* Checks values.schema.json cannot express; each failure names the value and what to change. */}}
{{- define "raylane.validate" -}}
{{- if and .Values.router.http.enabled (eq (int .Values.router.http.port) (int .Values.router.port)) }}
{{- fail "router.http.port: the HTTP API needs its own port; it equals router.port (gRPC)" }}
{{- end }}
{{- if not (include "raylane.routerMetricsOnHttp" .) }}
{{- if or (eq (int .Values.router.metricsPort) (int .Values.router.port)) (eq (int .Values.router.metricsPort) 8080) (and .Values.router.http.enabled (eq (int .Values.router.metricsPort) (int .Values.router.http.port))) }}
{{- fail (printf "router.metricsPort: %d is taken on the router pods (router.port, router.http.port or Ray's metrics port 8080); pick another" (int .Values.router.metricsPort)) }}
{{- end }}
{{- end }}
{{- if has (int .Values.controlPlane.metricsPort) (list (int .Values.controlPlane.adminPort) 6379 8080 8265 10001) }}
{{- fail (printf "controlPlane.metricsPort: %d is taken on the head pod (controlPlane.adminPort or a Ray port: 6379, 8080, 8265, 10001); pick another" (int .Values.controlPlane.metricsPort)) }}
{{- end }}
{{- if not (or .Values.redis.enabled .Values.externalRedis.url) }}
{{- fail "Redis: set redis.enabled=true (the bundled StatefulSet) or externalRedis.url=redis://host:6379/0" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.externalRedis.url }}
{{- fail "Redis: externalRedis.url is set but redis.enabled is true; set redis.enabled=false to use the external one" }}
{{- end }}
{{- if and .Values.modelStorage.enabled (not .Values.modelStorage.existingClaim) }}
{{- fail "modelStorage.existingClaim: name the PVC holding the models when modelStorage.enabled is true" }}
{{- end }}
{{- $groups := dict }}
{{- range $i, $g := .Values.ray.workerGroups }}
{{- if hasKey $groups $g.name }}
{{- fail (printf "ray.workerGroups[%d].name: duplicate worker group %q" $i $g.name) }}
{{- end }}
{{- $_ := set $groups $g.name true }}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "ray.workerGroups[%d] (%s): need minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $i $g.name (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- $names := dict }}
{{- range $i, $d := .Values.deployments }}
{{- if hasKey $names $d.name }}
{{- fail (printf "deployments[%d].name: duplicate deployment %q" $i $d.name) }}
{{- end }}
{{- $_ := set $names $d.name true }}
{{- $roles := dict }}
{{- range $j, $p := $d.pools }}
{{- if hasKey $roles $p.role }}
{{- fail (printf "deployments[%d].pools[%d].role: duplicate role %q; each role has one pool" $i $j $p.role) }}
{{- end }}
{{- $_ := set $roles $p.role true }}
{{- end }}
{{- if and (hasKey $roles "mixed") (or (hasKey $roles "prefill") (hasKey $roles "decode")) }}
{{- fail (printf "deployments[%d].pools: a 'mixed' pool cannot be combined with 'prefill' or 'decode' pools" $i) }}
{{- end }}
{{- if ne (hasKey $roles "prefill") (hasKey $roles "decode") }}
{{- fail (printf "deployments[%d].pools: 'prefill' and 'decode' pools come in pairs (one hands its requests to the other)" $i) }}
{{- end }}
{{- $adapters := dict }}
{{- range $j, $a := (default list $d.adapters) }}
{{- if hasKey $adapters $a.name }}
{{- fail (printf "deployments[%d].adapters[%d].name: duplicate adapter %q" $i $j $a.name) }}
{{- end }}
{{- $_ := set $adapters $a.name true }}
{{- if and $a.deployment (ne $a.deployment $d.name) }}
{{- fail (printf "deployments[%d].adapters[%d].deployment: must be %q (or left out), got %q" $i $j $d.name $a.deployment) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
