{{/*
Names, labels, images and the pieces every pod shares. Checks of value combinations that a
JSON schema cannot express clearly also live here (`edgefleet.validate`), so a bad combination
fails the render with a message naming the values to change.
*/}}

{{- define "edgefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-edgefleet", or the release name when it already contains the chart name. */}}
{{- define "edgefleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "edgefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; call with (dict "root" $ "component" "operator"). */}}
{{- define "edgefleet.labels" -}}
helm.sh/chart: {{ include "edgefleet.chart" .root }}
{{ include "edgefleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: edgefleet
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels a component's selector matches (stable across upgrades). */}}
{{- define "edgefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgefleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference; call with (dict "image" .Values.x.image "root" $). Digest wins over tag. */}}
{{- define "edgefleet.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The pipeline Jobs' image: its own when given, else the operator's. */}}
{{- define "edgefleet.jobImage" -}}
{{- $job := .Values.operator.jobs.image }}
{{- if $job.repository }}
{{- include "edgefleet.image" (dict "image" $job "root" .) }}
{{- else }}
{{- include "edgefleet.image" (dict "image" .Values.operator.image "root" .) }}
{{- end }}
{{- end }}

{{- define "edgefleet.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "edgefleet.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgefleet.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (printf "%s-gateway" (include "edgefleet.fullname" .)) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgefleet.jobs.serviceAccountName" -}}
{{- default (printf "%s-pipeline" (include "edgefleet.fullname" .)) .Values.operator.jobs.serviceAccount.name }}
{{- end }}

{{- define "edgefleet.agents.namespace" -}}
{{- default .Release.Namespace .Values.agents.namespace }}
{{- end }}

{{/* Secret and ConfigMap names: the referenced one, or the one the chart creates. */}}
{{- define "edgefleet.signingKeys.secretName" -}}
{{- default (printf "%s-signing-keys" (include "edgefleet.fullname" .)) .Values.signingKeys.existingSecret }}
{{- end }}

{{- define "edgefleet.pki.secretName" -}}
{{- default (printf "%s-gateway-pki" (include "edgefleet.fullname" .)) .Values.gateway.pki.existingSecret }}
{{- end }}

{{- define "edgefleet.store.secretName" -}}
{{- default (printf "%s-s3-credentials" (include "edgefleet.fullname" .)) .Values.store.credentials.existingSecret }}
{{- end }}

{{- define "edgefleet.trust.configMapName" -}}
{{- default (printf "%s-agent-trust" (include "edgefleet.fullname" .)) .Values.agents.trust.existingConfigMap }}
{{- end }}

{{- define "edgefleet.minio.fullname" -}}
{{- printf "%s-minio" (include "edgefleet.fullname" .) }}
{{- end }}

{{/* The store URL every component gets: s3://bucket[/prefix]. */}}
{{- define "edgefleet.store.url" -}}
{{- if .Values.store.prefix }}
{{- printf "s3://%s/%s" .Values.store.bucket .Values.store.prefix }}
{{- else }}
{{- printf "s3://%s" .Values.store.bucket }}
{{- end }}
{{- end }}

{{/* The S3 endpoint: the bundled MinIO's Service when enabled, else store.endpoint (may be empty). */}}
{{- define "edgefleet.store.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc:9000" (include "edgefleet.minio.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.store.endpoint }}
{{- end }}
{{- end }}

{{/* The gateway Service's in-cluster DNS name. */}}
{{- define "edgefleet.gateway.host" -}}
{{- printf "%s-gateway.%s.svc" (include "edgefleet.fullname" .) .Release.Namespace }}
{{- end }}

{{/* S3 connection environment for the operator, the gateway and the bucket Job. */}}
{{- define "edgefleet.store.env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "edgefleet.store.secretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "edgefleet.store.secretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- with (include "edgefleet.store.endpoint" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.store.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The restricted Pod Security profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted),
pod level and container level. The root filesystem is read-only: every writable path is an emptyDir.
*/}}
{{- define "edgefleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "edgefleet.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* HOME and caches on the writable /tmp (matplotlib, which the pipeline's reports use, writes its config there). */}}
{{- define "edgefleet.writableEnv" -}}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{- define "edgefleet.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Namespaces where the chart creates the pipeline Jobs' ServiceAccount (as a JSON list): the Jobs'
namespace when one is set, else every watched namespace. Serving all namespaces with Jobs in each
model's namespace leaves none: the Jobs then run as each namespace's default ServiceAccount (they
get no token either way), unless serviceAccount.create is false and `name` exists everywhere.
*/}}
{{- define "edgefleet.jobs.serviceAccountNamespaces" -}}
{{- if .Values.operator.jobs.namespace }}
{{- list .Values.operator.jobs.namespace | toJson }}
{{- else if .Values.operator.watch.allNamespaces }}
{{- list | toJson }}
{{- else }}
{{- .Values.operator.watch.namespaces | uniq | toJson }}
{{- end }}
{{- end }}

{{/* Whether `edgefleet operator run` gets --job-service-account. */}}
{{- define "edgefleet.jobs.serviceAccountFlag" -}}
{{- $sa := .Values.operator.jobs.serviceAccount }}
{{- if $sa.create }}
{{- if fromJsonArray (include "edgefleet.jobs.serviceAccountNamespaces" .) }}true{{ end }}
{{- else if $sa.name }}true{{ end }}
{{- end }}

{{/* Combinations the schema cannot name well; each failure says which values to change. */}}
{{- define "edgefleet.validate" -}}
{{- if and .Values.signingKeys.existingSecret .Values.signingKeys.data }}
{{- fail "signingKeys: set either existingSecret or data, not both (existingSecret=\"\" to let the chart create the Secret)" }}
{{- end }}
{{- if and (not .Values.signingKeys.existingSecret) (not .Values.signingKeys.data) }}
{{- fail "signingKeys: set existingSecret (a Secret made by `edgefleet keys secret`) or data" }}
{{- end }}
{{- $pki := .Values.gateway.pki }}
{{- $pkiFiles := list $pki.files.caPem $pki.files.caKeyPem $pki.files.serverPem $pki.files.serverKeyPem | compact }}
{{- if and $pki.existingSecret $pkiFiles }}
{{- fail "gateway.pki: set either existingSecret or files, not both (existingSecret=\"\" to let the chart create the Secret)" }}
{{- end }}
{{- if and (not $pki.existingSecret) (ne (len $pkiFiles) 4) }}
{{- fail "gateway.pki.files: caPem, caKeyPem, serverPem and serverKeyPem are all needed when gateway.pki.existingSecret is empty" }}
{{- end }}
{{- $creds := .Values.store.credentials }}
{{- if and $creds.existingSecret (or $creds.accessKeyId $creds.secretAccessKey) }}
{{- fail "store.credentials: set either existingSecret or accessKeyId/secretAccessKey, not both (existingSecret=\"\" to let the chart create the Secret)" }}
{{- end }}
{{- if and (not $creds.existingSecret) (not (and $creds.accessKeyId $creds.secretAccessKey)) }}
{{- fail "store.credentials: set existingSecret, or both accessKeyId and secretAccessKey" }}
{{- end }}
{{- if and (eq .Values.operator.buildMode "jobs") (not $creds.existingSecret) .Values.operator.watch.allNamespaces (not .Values.operator.jobs.namespace) }}
{{- fail "operator.jobs.namespace: set it when buildMode is jobs, every namespace is served and the chart creates the S3 credentials: the Jobs read them from a Secret in their own namespace, and the chart cannot create one in every namespace" }}
{{- end }}
{{- if and .Values.minio.enabled .Values.store.endpoint }}
{{- fail "store.endpoint must be empty with minio.enabled: the operator and gateway use the bundled MinIO" }}
{{- end }}
{{- if and (not .Values.operator.watch.allNamespaces) (not .Values.operator.watch.namespaces) }}
{{- fail "operator.watch.namespaces: name at least one namespace when operator.watch.allNamespaces is false" }}
{{- end }}
{{- if .Values.agents.enabled }}
{{- $trust := .Values.agents.trust }}
{{- if and $trust.existingConfigMap (or $trust.rootJson $trust.caPem) }}
{{- fail "agents.trust: set either existingConfigMap or rootJson/caPem, not both" }}
{{- end }}
{{- if and (not $trust.existingConfigMap) (not (and $trust.rootJson $trust.caPem)) }}
{{- fail "agents.trust: set existingConfigMap, or both rootJson and caPem (--set-file agents.trust.rootJson=root.json --set-file agents.trust.caPem=ca.pem)" }}
{{- end }}
{{- if not .Values.agents.classes }}
{{- fail "agents.classes: list at least one device class when agents.enabled is true" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Egress rules every EdgeFleet pod needs when egress is restricted: DNS and the store. */}}
{{- define "edgefleet.egress.common" -}}
- ports:
    {{- toYaml .Values.networkPolicy.egress.dns.ports | nindent 4 }}
  {{- with .Values.networkPolicy.egress.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if .Values.minio.enabled }}
- ports:
    - port: 9000
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "edgefleet.selectorLabels" (dict "root" . "component" "minio") | nindent 10 }}
{{- else }}
- ports:
    {{- toYaml .Values.networkPolicy.egress.store.ports | nindent 4 }}
  {{- with .Values.networkPolicy.egress.store.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
