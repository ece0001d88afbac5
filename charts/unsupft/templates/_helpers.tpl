{{- define "unsupft.runId" -}}{{ default .Release.Name .Values.runId }}{{- end -}}
{{- define "unsupft.labels" -}}
app.kubernetes.io/name: unsupft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
unsupft.io/run: {{ include "unsupft.runId" . }}
{{- end -}}
