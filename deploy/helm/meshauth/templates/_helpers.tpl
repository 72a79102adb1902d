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

{{/*
Why the agent does what checkov flags (each finding justified here, where
the setting is; cli/tests/chart.rs fails on any finding not listed).
*/}}
{{- define "meshauth.agentCheckovSkips" -}}
checkov.io/skip1: "CKV_K8S_19=The datapath, the handshake port (4250) and WireGuard live in the node's network namespace"
checkov.io/skip2: "CKV_K8S_25=BPF and NET_ADMIN load and attach the datapath and manage WireGuard; see agent.capabilities"
checkov.io/skip3: "CKV_K8S_23=bpffs pins, the state directory and the API socket on the host are root's; no other privilege comes with uid 0 (ALL capabilities dropped but three, no privilege escalation)"
checkov.io/skip4: "CKV_K8S_40=Runs as root for the host's root-owned bpffs and state directory (see CKV_K8S_23)"
checkov.io/skip5: "CKV_K8S_38=The agent watches pods, nodes and policies and allocates identities through the API server"
checkov.io/skip6: "CKV_K8S_11=No CPU limit on a node-critical agent: throttling would delay authentication and drop traffic; the request reserves its share"
checkov.io/skip7: "CKV_K8S_15=IfNotPresent: a restarted node agent must not depend on the registry; pin image.digest for immutability"
checkov.io/skip8: "CKV_K8S_43=The tag follows the chart's appVersion by default; set image.digest to pin by digest"
checkov.io/skip9: "CKV2_K8S_6=Host-network pods are outside NetworkPolicy; the handshake port limits connections per source itself"
{{- if eq .Values.spire.svidMode "delegated-pods" }}
checkov.io/skip10: "CKV_K8S_17=delegated-pods: SPIRE attests each pod by a PID the agent reads from the pod's cgroup, which must be the host's"
{{- end }}
{{- end -}}

{{- define "meshauth.spireServerCheckovSkips" -}}
checkov.io/skip1: "CKV_K8S_8=The reconciler container has no listener to probe; it exits on a fatal error and is restarted (the server container has both probes)"
checkov.io/skip2: "CKV_K8S_9=The reconciler container has no listener to probe (see CKV_K8S_8)"
checkov.io/skip3: "CKV_K8S_11=No CPU limit on the SPIRE server: throttling delays SVID issuance for the whole cluster; the request reserves its share"
checkov.io/skip4: "CKV_K8S_38=k8s_psat TokenReviews, the bundle ConfigMap and the reconciler's reads need the API server"
checkov.io/skip5: "CKV_K8S_15=IfNotPresent: a restarted SPIRE server must not depend on the registry; pin images by digest in spire.bundled.image"
checkov.io/skip6: "CKV_K8S_43=Set spire.bundled.image.server (and image.digest) to a digest to pin"
{{- end -}}

{{- define "meshauth.spireAgentCheckovSkips" -}}
checkov.io/skip1: "CKV_K8S_17=SPIRE's k8s workload attestor reads the callers' cgroups by their host PIDs"
checkov.io/skip2: "CKV_K8S_23=The Workload API socket directory on the host and every pod's /proc entries are root's"
checkov.io/skip3: "CKV_K8S_40=Runs as root for the host socket directory and /proc (see CKV_K8S_23)"
checkov.io/skip4: "CKV_K8S_11=No CPU limit on a node-critical SPIRE agent: throttling delays SVIDs to every workload of the node"
checkov.io/skip5: "CKV_K8S_38=The k8s workload attestor asks the kubelet for the node's pods with this token"
checkov.io/skip6: "CKV_K8S_15=IfNotPresent: a restarted node agent must not depend on the registry; pin images by digest in spire.bundled.image"
checkov.io/skip7: "CKV_K8S_43=Set spire.bundled.image.agent to a digest to pin"
{{- end -}}
