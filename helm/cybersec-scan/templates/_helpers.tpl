{{/* Names, labels and the pieces both Deployments share. */}}

{{- define "cybersec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cybersec.fullname" -}}
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

{{- define "cybersec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cybersec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cybersec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cybersec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cybersec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cybersec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cybersec.secretName" -}}
{{- default (include "cybersec.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "cybersec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The queue the workers consume (shared.settings.Settings.scan_queue). */}}
{{- define "cybersec.scanQueue" -}}
{{- printf "%s.scans" .Values.config.queuePrefix }}
{{- end }}

{{- define "cybersec.criticalQueue" -}}
{{- printf "%s.scans.critical" .Values.config.queuePrefix }}
{{- end }}

{{/* Inside the /tmp emptyDir: the root filesystem is read-only. */}}
{{- define "cybersec.heartbeatFile" -}}
/tmp/cybersec-worker.heartbeat
{{- end }}

{{- define "cybersec.workerGracePeriod" -}}
{{- add .Values.worker.shutdownTimeout .Values.worker.shutdownGraceMargin }}
{{- end }}

{{/* Every CYBERSEC_* variable: non-secret ones from the ConfigMap, URLs from the Secret. Call
with (dict "root" $ "component" "api"): only the API receives the API keys. */}}
{{- define "cybersec.env" -}}
{{- $component := .component }}
{{- with .root }}
envFrom:
  - configMapRef:
      name: {{ include "cybersec.fullname" . }}
env:
  - name: CYBERSEC_BROKER_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "cybersec.secretName" . }}
        key: broker-url
  - name: CYBERSEC_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "cybersec.secretName" . }}
        key: redis-url
  - name: CYBERSEC_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "cybersec.secretName" . }}
        key: database-url
{{- if eq $component "api" }}
  - name: CYBERSEC_API_KEYS
    valueFrom:
      secretKeyRef:
        name: {{ include "cybersec.secretName" . }}
        key: api-keys
        optional: true
{{- end }}
{{- end }}
{{- end }}

{{/* Rolls the pods when the chart's ConfigMap or Secret changes. */}}
{{- define "cybersec.checksums" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{- define "cybersec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "cybersec.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "cybersec.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "cybersec.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* A value as the environment wants it: Helm reads every number as a float, and prints one of
a million or more as 1e+06, which pydantic would refuse for an int setting. Lists become
comma-separated. */}}
{{- define "cybersec.envValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . | quote }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}
