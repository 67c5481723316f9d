{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "servo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" (or fullnameOverride), truncated to 63 characters. */}}
{{- define "servo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's name: "<fullname>-<component>" within 63 characters. */}}
{{- define "servo.componentName" -}}
{{- printf "%s-%s" (include "servo.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "servo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "servo.labels" -}}
helm.sh/chart: {{ include "servo.chart" . }}
{{ include "servo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "servo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "servo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component (gateway, controller). */}}
{{- define "servo.componentSelectorLabels" -}}
{{ include "servo.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "servo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "servo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "servo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the token: the existing one, or the chart's. */}}
{{- define "servo.tokenSecretName" -}}
{{- default (include "servo.componentName" (dict "root" . "component" "token")) .Values.token.existingSecret -}}
{{- end -}}

{{- define "servo.tokenEnabled" -}}
{{- if or .Values.token.existingSecret .Values.token.value -}}true{{- end -}}
{{- end -}}

{{/* The registry URL from its Secret (SERVO_REGISTRY_URL). */}}
{{- define "servo.registryEnv" -}}
- name: SERVO_REGISTRY_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.existingSecret }}
      key: {{ .Values.registry.key }}
{{- end -}}

{{/* Pod-level security: non-root, the runtime's default seccomp profile. */}}
{{- define "servo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "servo.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Probes on the OIP health endpoints of the named port (startup: optional; readyPath:
the readiness path, default /v2/health/ready). */}}
{{- define "servo.probes" -}}
{{- with .startup }}
startupProbe:
  httpGet:
    path: /v2/health/live
    port: {{ $.port }}
  {{- toYaml . | nindent 2 }}
{{- end }}
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: {{ .port }}
  {{- toYaml .live | nindent 2 }}
readinessProbe:
  httpGet:
    path: {{ .readyPath | default "/v2/health/ready" }}
    port: {{ .port }}
  {{- toYaml .ready | nindent 2 }}
{{- end -}}

{{/* The claim of a persisted volume (`payloadLog` or `data`): the existing one, or the
chart's "<fullname>-<component>". Empty when persistence is off. */}}
{{- define "servo.claimName" -}}
{{- $p := .persistence -}}
{{- if $p.enabled -}}
{{- default (include "servo.componentName" (dict "root" .root "component" .component)) $p.existingClaim -}}
{{- end -}}
{{- end -}}

{{/* A pod volume: the claim when persistence is on, else an emptyDir. */}}
{{- define "servo.volume" -}}
- name: {{ .name }}
  {{- $claim := include "servo.claimName" . }}
  {{- if $claim }}
  persistentVolumeClaim:
    claimName: {{ $claim }}
    {{- if .readOnly }}
    readOnly: true
    {{- end }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end -}}

{{/* The payload log folder (SERVO_PAYLOAD_LOG_DIR) of gateway and controller pods. */}}
{{- define "servo.payloadLogDir" -}}/var/lib/servo-payload{{- end -}}

{{/* The controller's data folder (`servo up --dir`): artifacts, versions, run logs. */}}
{{- define "servo.dataDir" -}}/var/lib/servo{{- end -}}

{{/* The controller's Prometheus, required with the controller: it serves no model, so
its monitors and canary judge read the Prometheus that scrapes the gateway pods. */}}
{{- define "servo.prometheusUrl" -}}
{{- required "controller.prometheusUrl is required with controller.enabled: the controller serves no model (servo up --no-serve-models), so its monitors and canary judge read the Prometheus that scrapes the gateway pods, e.g. --set controller.prometheusUrl=http://prometheus-operated.monitoring:9090" .Values.controller.prometheusUrl -}}
{{- end -}}

{{/* SERVO_K8S_RUNTIME: deployer.runtime, else the chart's ServingRuntime when enabled,
else empty (KServe picks its own runtime for the format). */}}
{{- define "servo.k8sRuntime" -}}
{{- if .Values.deployer.runtime -}}
{{- .Values.deployer.runtime -}}
{{- else if .Values.servingRuntime.enabled -}}
{{- include "servo.componentName" (dict "root" . "component" "runtime") -}}
{{- end -}}
{{- end -}}

{{/* SERVO_K8S_STORAGE_PREFIX: deployer.storagePrefix, else the data claim as pvc://CLAIM/
(its root is the controller's data folder). The kubernetes deployer needs one of them:
KServe's storage initializer must reach the version's folder. */}}
{{- define "servo.k8sStoragePrefix" -}}
{{- if .Values.deployer.storagePrefix -}}
{{- .Values.deployer.storagePrefix -}}
{{- else -}}
{{- $claim := include "servo.claimName" (dict "root" . "component" "data" "persistence" .Values.data.persistence) -}}
{{- if $claim -}}
{{- printf "pvc://%s/" $claim -}}
{{- else if eq .Values.deployer.kind "kubernetes" -}}
{{- fail "deployer.kind=kubernetes needs data.persistence.enabled (the artifacts on a PersistentVolumeClaim, served to KServe as pvc://CLAIM/...) or deployer.storagePrefix" -}}
{{- end -}}
{{- end -}}
{{- end -}}
