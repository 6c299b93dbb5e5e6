{{/* Names are fixed per release so that RBAC, the admission policy and the cleanup hook agree. */}}
{{- define "beekeeper.fullname" -}}
{{- if contains "beekeeper" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-beekeeper" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "beekeeper.operatorName" -}}{{ include "beekeeper.fullname" . }}-operator{{- end -}}
{{- define "beekeeper.nodeDaemonName" -}}{{ include "beekeeper.fullname" . }}-node-daemon{{- end -}}
{{- define "beekeeper.cleanupName" -}}{{ include "beekeeper.fullname" . }}-uninstall-cleanup{{- end -}}

{{- define "beekeeper.labels" -}}
app.kubernetes.io/name: beekeeper
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: beekeeper
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "beekeeper.selector" -}}
app.kubernetes.io/name: beekeeper
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "beekeeper.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The username the apiserver gives the node daemon's service-account tokens. */}}
{{- define "beekeeper.nodeDaemonUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "beekeeper.nodeDaemonName" . }}
{{- end -}}

{{- define "beekeeper.logEnv" -}}
- name: BEEKEEPER_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: BEEKEEPER_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{/* Where the registry CA bundle is mounted (both components), when bytecodeImages.registryCA names one. */}}
{{- define "beekeeper.registryCAFile" -}}/etc/beekeeper/registry-ca/{{ .Values.bytecodeImages.registryCA.key }}{{- end -}}

{{- define "beekeeper.registryCAVolume" -}}
{{- with .Values.bytecodeImages.registryCA.configMapName }}
- name: registry-ca
  configMap:
    name: {{ . }}
{{- end }}
{{- end -}}
