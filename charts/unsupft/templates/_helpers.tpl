{{/* Every name is cut to 63 characters (the limit of names and label values); the driver Job's
     "-driver-r<revision>" suffix is kept whole. */}}
{{- define "unsupft.fullname" -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "unsupft.name" -}}{{ printf "%s-%s" (.root.Release.Name | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}{{- end -}}

{{/* The run id (default: the release name) starts every stage object's name; the operators'
     webhooks want DNS-1035 names, and 40 characters leave room for "-<stage>-<attempt>". */}}
{{- define "unsupft.runId" -}}
{{- $id := default .Release.Name .Values.runId -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$" $id) -}}
{{- fail (printf "run id %q (the release name unless runId is set) must be a DNS-1035 name of at most 40 characters: lower-case letters, digits and '-', starting with a letter" $id) -}}
{{- end -}}
{{- $id -}}
{{- end -}}

{{- define "unsupft.serviceAccount" -}}
{{- if .Values.serviceAccount.name }}{{ .Values.serviceAccount.name }}{{ else if .Values.rbacOnly }}unsupft-driver{{ else }}{{ include "unsupft.name" (dict "root" . "suffix" "driver") }}{{ end -}}
{{- end -}}

{{- define "unsupft.labels" -}}
app.kubernetes.io/name: unsupft
app.kubernetes.io/instance: {{ include "unsupft.fullname" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | trunc 63 | trimSuffix "-" }}
{{- if not .Values.rbacOnly }}
unsupft.io/run: {{ include "unsupft.runId" . }}
{{- end }}
{{- end -}}

{{- define "unsupft.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "unsupft.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
capabilities: {drop: ["ALL"]}
{{- end -}}

{{- define "unsupft.trainingRuntime" -}}
{{- $on := .Values.trainingRuntime.enabled -}}
{{- if or (eq (toString $on) "true") (and (eq (toString $on) "auto") (.Capabilities.APIVersions.Has (printf "trainer.kubeflow.org/v1alpha1/%s" .Values.trainingRuntime.kind))) -}}true{{- end -}}
{{- end -}}
