{{- define "netpol.labels" -}}
app.kubernetes.io/name: netpol-agent
app.kubernetes.io/part-of: netpol
{{- end -}}

{{- define "netpol.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
