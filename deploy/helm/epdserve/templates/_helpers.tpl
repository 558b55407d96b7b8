{{/* Names and labels. */}}
{{- define "epdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{ else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "epdserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "epdserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
{{- end }}

{{/* The stages with pods of their own, space-separated: encode runs inside the prefill pods when
     encode.colocated (prefill --with-encode), so it then has no Deployment, Service, PDB or policy. */}}
{{- define "epdserve.podStages" -}}
{{- if not .Values.encode.colocated }}encode {{ end }}prefill decode
{{- end }}

{{- define "epdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "epdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "epdserve.fullname" .) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{- define "epdserve.redisUrl" -}}
{{- if .Values.redis.bundled }}redis://{{ include "epdserve.fullname" . }}-redis:6379/0{{ else }}{{ required "redis.external.url is required when redis.bundled is false" .Values.redis.external.url }}{{ end }}
{{- end }}

{{/* The flags every service shares. */}}
{{- define "epdserve.commonArgs" -}}
- --host
- 0.0.0.0
- --port
- {{ .Values.grpcPort | quote }}
- --advertise-host
- $(POD_IP)
- --drain-timeout-s
- {{ .Values.drainTimeoutSeconds | quote }}
{{- with .Values.model.path }}
- --model
- {{ . }}
{{- end }}
- --log-level
- {{ .Values.logLevel }}
- --log-format
- {{ .Values.logFormat }}
{{- if .Values.metrics.enabled }}
- --metrics-host
- 0.0.0.0
- --metrics-port
- {{ .Values.metrics.port | quote }}
{{- end }}
{{- if .Values.tracing.enabled }}
- --trace-exporter
- otlp
{{- with .Values.tracing.endpoint }}
- --trace-endpoint
- {{ . }}
{{- end }}
- --trace-sample-ratio
- {{ .Values.tracing.sampleRatio | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- --health-port
- {{ .Values.probes.healthPort | quote }}
{{- end }}
{{- include "epdserve.securityArgs" . }}
{{- end }}

{{/* Security: the token and TLS files every service (and the helm test's client) is given, from
     Secrets mounted read-only. Rendering fails on an incomplete setting. */}}
{{- define "epdserve.checkSecurity" -}}
{{- if .Values.auth.enabled }}
{{- if and .Values.auth.existingSecret .Values.auth.token }}
{{- fail "auth: set one of auth.existingSecret and auth.token, not both" }}
{{- end }}
{{- if not (or .Values.auth.existingSecret .Values.auth.token) }}
{{- fail "auth.enabled needs auth.existingSecret (a Secret with the key token) or auth.token" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt, e.g. from cert-manager)" }}
{{- end }}
{{- end }}

{{- define "epdserve.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "epdserve.fullname" .)) }}
{{- end }}

{{- define "epdserve.securityArgs" -}}
{{- if .Values.auth.enabled }}
- --auth-token-file
- /etc/epdserve/auth/token
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/epdserve/tls/tls.crt
- --tls-key
- /etc/epdserve/tls/tls.key
- --tls-ca
- /etc/epdserve/tls/ca.crt
- --tls-server-name
- {{ .Values.tls.serverName | default (include "epdserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "epdserve.securityVolumeMounts" -}}
{{- if .Values.auth.enabled }}
- {name: auth, mountPath: /etc/epdserve/auth, readOnly: true}
{{- end }}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/epdserve/tls, readOnly: true}
{{- end }}
{{- end }}

{{/* defaultMode 288 = 0440: readable by the pod's user and fsGroup only */}}
{{- define "epdserve.securityVolumes" -}}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "epdserve.authSecretName" . }}
    defaultMode: 288
    items: [{key: token, path: token}]
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 288
    items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}, {key: ca.crt, path: ca.crt}]
{{- end }}
{{- end }}

{{/* Native gRPC probes against the standard health service (the stage's own service name for
     readiness, "" for liveness and startup). The kubelet's gRPC probes cannot do TLS: with
     tls.enabled they ask the plaintext health-only port (--health-port) instead. */}}
{{- define "epdserve.probes" -}}
{{- $port := ternary .root.Values.probes.healthPort .root.Values.grpcPort .root.Values.tls.enabled -}}
startupProbe:
  grpc: {port: {{ $port }}}
  periodSeconds: 10
  failureThreshold: {{ .root.Values.probes.startupFailureThreshold }}
livenessProbe:
  grpc: {port: {{ $port }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  grpc: {port: {{ $port }}, service: {{ .service | quote }}}
  periodSeconds: 5
  failureThreshold: 2
{{- end }}
