{{/* The chart name, or nameOverride. */}}
{{- define "audgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The object name: fullnameOverride, else the release name when it already contains the chart
name (`helm install audgate ...` gives `audgate`), else RELEASE-audgate.
*/}}
{{- define "audgate.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "audgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "audgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The pods' identity: Deployment selector, Services, PDB, NetworkPolicy. */}}
{{- define "audgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "audgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "audgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap holding audgate.yaml: the chart's own, or config.existingConfigMap. */}}
{{- define "audgate.configMapName" -}}
{{- if .Values.config.existingConfigMap -}}
{{- .Values.config.existingConfigMap -}}
{{- else -}}
{{- printf "%s-config" (include "audgate.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "audgate.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Where the pod sees its files: the config directory, and the TLS files under it. */}}
{{- define "audgate.configDir" -}}/etc/audgate{{- end -}}
{{- define "audgate.tlsDir" -}}/etc/audgate/tls{{- end -}}

{{/*
The audgate config the chart renders: a `listen` section from `ports` and `tls` (the container
ports and the Secret's mount must agree with it, so the chart owns that key), then
config.inline as written.
*/}}
{{- define "audgate.config" -}}
{{- $text := .Values.config.inline | default "" -}}
{{- if not (kindIs "string" $text) -}}
{{- fail "config.inline is the audgate.yaml text, a string (`inline: |`), not a map" -}}
{{- end -}}
{{- if regexMatch "(?m)^listen\\s*:" $text -}}
{{- fail "config.inline sets `listen`, which the chart writes: use the values `ports` and `tls` instead" -}}
{{- end -}}
{{- $listen := dict "grpc" (printf "0.0.0.0:%d" (int .Values.ports.grpc)) "http" (printf "0.0.0.0:%d" (int .Values.ports.http)) "admin" (printf "0.0.0.0:%d" (int .Values.ports.admin)) -}}
{{- if .Values.tls.enabled -}}
{{- $dir := include "audgate.tlsDir" . -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) -}}
{{- if .Values.tls.clientCA.enabled -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- end -}}
{{- with .Values.tls.clientSans -}}
{{- $_ := set $tls "client_sans" . -}}
{{- end -}}
{{- $_ := set $listen "tls" $tls -}}
{{- end -}}
# listen: written by the Helm chart from the values `ports` and `tls`
{{ toYaml (dict "listen" $listen) }}

{{ $text }}
{{- end -}}
