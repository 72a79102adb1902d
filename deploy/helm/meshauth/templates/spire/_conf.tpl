{{/*
SPIRE's server.conf and agent.conf for the bundled SPIRE, byte for byte what
`meshauth spire render --deployment kubernetes` writes for the same settings
(deploy/helm/tests checks it): keep both in step.
*/}}

{{- define "meshauth.spire.names" -}}
{{- $full := include "meshauth.fullname" . -}}
{{- $ns := include "meshauth.spireNamespace" . -}}
{{- dict
  "server" (printf "%s-spire-server" $full)
  "agent" (printf "%s-spire-agent" $full)
  "bundle" (printf "%s-spire-bundle" $full)
  "ns" $ns
  "serverAddress" (printf "%s-spire-server.%s.svc" $full $ns)
  | toJson -}}
{{- end -}}

{{- define "meshauth.spire.serverConf" -}}
{{- $b := .Values.spire.bundled -}}
{{- $n := include "meshauth.spire.names" . | fromJson -}}
server {
  bind_address = "0.0.0.0"
  bind_port = "8081"
  socket_path = "/run/spire/server/private/api.sock"
  trust_domain = {{ .Values.trustDomain | quote }}
  data_dir = "/var/lib/spire/server"
  log_level = "INFO"
  ca_ttl = {{ $b.server.caTTL | quote }}
  default_x509_svid_ttl = {{ $b.server.svidTTL | quote }}
{{- with $b.server.agentTTL }}
  agent_ttl = {{ . | quote }}
{{- end }}
}

plugins {
{{- if eq $b.server.datastore "postgres" }}
  DataStore "sql" {
    plugin_data_file = "/run/spire/datastore/datastore.hcl"
  }
{{- else }}
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "/var/lib/spire/server/datastore.sqlite3"
    }
  }
{{- end }}

  NodeAttestor "k8s_psat" {
    plugin_data {
      clusters = {
        {{ $b.cluster | quote }} = {
          "service_account_allow_list" = [
            {{ printf "%s:%s" $n.ns $n.agent | quote }}
          ]
        }
      }
    }
  }

  KeyManager "disk" {
    plugin_data {
      keys_path = "/var/lib/spire/server/keys.json"
    }
  }

  Notifier "k8sbundle" {
    plugin_data {
      namespace = {{ $n.ns | quote }}
      config_map = {{ $n.bundle | quote }}
    }
  }
}

health_checks {
  listener_enabled = true
  bind_address = "0.0.0.0"
  bind_port = "8080"
  live_path = "/live"
  ready_path = "/ready"
}
{{ end -}}

{{- define "meshauth.spire.agentConf" -}}
{{- $b := .Values.spire.bundled -}}
{{- $n := include "meshauth.spire.names" . | fromJson -}}
agent {
  data_dir = "/var/lib/spire/agent"
  log_level = "INFO"
  server_address = {{ $n.serverAddress | quote }}
  server_port = "8081"
  socket_path = {{ printf "%s/%s" .Values.spire.socketDir .Values.spire.socketName | quote }}
  trust_bundle_path = "/run/spire/bundle/bundle.crt"
  trust_domain = {{ .Values.trustDomain | quote }}
{{- if eq .Values.spire.svidMode "delegated-pods" }}
  admin_socket_path = {{ printf "%s/%s" .Values.spire.adminSocketDir .Values.spire.adminSocketName | quote }}
  authorized_delegates = [
    {{ include "meshauth.delegateId" . | quote }}
  ]
{{- end }}
}

plugins {
  NodeAttestor "k8s_psat" {
    plugin_data {
      cluster = {{ $b.cluster | quote }}
    }
  }

  KeyManager "disk" {
    plugin_data {
      directory = "/var/lib/spire/agent"
    }
  }

  WorkloadAttestor "k8s" {
    plugin_data {
      node_name_env = "MY_NODE_NAME"
    }
  }
}

health_checks {
  listener_enabled = true
  bind_address = "0.0.0.0"
  bind_port = "8082"
  live_path = "/live"
  ready_path = "/ready"
}
{{ end -}}
