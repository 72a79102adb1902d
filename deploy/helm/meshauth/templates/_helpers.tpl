{{/* The chart's name. */}}
{{- define "meshauth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name. */}}
{{- define "meshauth.fullname" -}}
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

{{- define "meshauth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of the agents. */}}
{{- define "meshauth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshauth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* Common labels. */}}
{{- define "meshauth.labels" -}}
helm.sh/chart: {{ include "meshauth.chart" . }}
app.kubernetes.io/name: {{ include "meshauth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshauth
{{- end -}}

{{- define "meshauth.serviceAccountName" -}}
{{- default (printf "%s-agent" (include "meshauth.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "meshauth.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The SPIFFE ID the meshauth agents have (delegated-pods: SPIRE's authorized delegate). */}}
{{- define "meshauth.delegateId" -}}
{{- default (printf "spiffe://%s/meshauth/agent" .Values.trustDomain) .Values.spire.delegateId -}}
{{- end -}}

{{/* The namespace bundled SPIRE runs in. */}}
{{- define "meshauth.spireNamespace" -}}
{{- default .Release.Namespace .Values.spire.bundled.namespace -}}
{{- end -}}

{{/* The SPIRE socket the agent uses, as a unix:// URI. */}}
{{- define "meshauth.spireSocket" -}}
{{- if eq .Values.spire.svidMode "delegated-pods" -}}
{{- printf "unix://%s/%s" .Values.spire.adminSocketDir .Values.spire.adminSocketName -}}
{{- else -}}
{{- printf "unix://%s/%s" .Values.spire.socketDir .Values.spire.socketName -}}
{{- end -}}
{{- end -}}

{{/* Refusals: settings that cannot work together. */}}
{{- define "meshauth.validate" -}}
{{- $b := .Values.spire.bundled -}}
{{- if and (eq .Values.spire.mode "bundled") (eq $b.server.datastore "sqlite3") (gt (int $b.server.replicas) 1) -}}
{{- fail (printf "spire.bundled.server.replicas is %d but the datastore is sqlite3, which one server alone may use: set spire.bundled.server.datastore=postgres (with spire.bundled.server.postgres.secretName) or replicas=1" (int $b.server.replicas)) -}}
{{- end -}}
{{- if and (eq .Values.spire.mode "bundled") (eq $b.server.datastore "postgres") (not $b.server.postgres.secretName) -}}
{{- fail "spire.bundled.server.datastore is postgres but spire.bundled.server.postgres.secretName is empty: name the Secret holding the connection string" -}}
{{- end -}}
{{- if and (eq .Values.spire.svidMode "delegated-pods") (eq (clean .Values.spire.adminSocketDir) (clean .Values.spire.socketDir)) -}}
{{- fail "spire.adminSocketDir is the Workload API socket's directory: every workload that mounts it could reach the admin socket; use another directory" -}}
{{- end -}}
{{- end -}}
