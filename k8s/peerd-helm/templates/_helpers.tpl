{{- define "peerd.namespace" -}}{{ .Values.peerd.namespace.k8s }}{{- end -}}
{{- define "peerd.labels" -}}
app: peerd
app.kubernetes.io/name: peerd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "peerd.mirror" -}}http://localhost:{{ .Values.peerd.ports.http }}{{- end -}}
{{- /* Azure Peerd's values give hosts as a comma-separated string or as a list. */ -}}
{{- define "peerd.hosts" -}}
{{- if kindIs "slice" .Values.peerd.hosts -}}{{ join "," .Values.peerd.hosts }}{{- else -}}{{ .Values.peerd.hosts }}{{- end -}}
{{- end -}}
