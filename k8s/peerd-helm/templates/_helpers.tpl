{{- define "peerd.namespace" -}}{{ .Values.peerd.namespace.k8s }}{{- end -}}
{{- define "peerd.labels" -}}
app: peerd
app.kubernetes.io/name: peerd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "peerd.mirror" -}}http://localhost:{{ .Values.peerd.ports.http }}{{- end -}}
