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
{{- end }}

{{/* Native gRPC probes against the standard health service (the stage's own service name for
     readiness, "" for liveness and startup). */}}
{{- define "epdserve.probes" -}}
startupProbe:
  grpc: {port: {{ .root.Values.grpcPort }}}
  periodSeconds: 10
  failureThreshold: {{ .root.Values.probes.startupFailureThreshold }}
livenessProbe:
  grpc: {port: {{ .root.Values.grpcPort }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  grpc: {port: {{ .root.Values.grpcPort }}, service: {{ .service | quote }}}
  periodSeconds: 5
  failureThreshold: 2
{{- end }}
