{{/* Names, labels and image references shared by the templates. */}}

{{- define "zerofs-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zerofs-csi.fullname" -}}
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

{{/*
Labels of every object. The per-volume objects the driver creates carry
app.kubernetes.io/managed-by=zerofs-csi and component=volume-server, so the
selectors below (component controller or node) never match them.
*/}}
{{- define "zerofs-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "zerofs-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "node"). */}}
{{- define "zerofs-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zerofs-csi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "zerofs-csi.componentLabels" -}}
{{ include "zerofs-csi.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "zerofs-csi.controllerName" -}}
{{- printf "%s-controller" (include "zerofs-csi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zerofs-csi.nodeName" -}}
{{- printf "%s-node" (include "zerofs-csi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The plugin image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "zerofs-csi.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "zerofs-csi.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}

{{/* The Secret the StorageClasses reference unless they name their own. */}}
{{- define "zerofs-csi.secretName" -}}
{{- if .Values.secret.existingSecret -}}
{{- .Values.secret.existingSecret -}}
{{- else -}}
{{- printf "%s-secret" (include "zerofs-csi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The Secrets the StorageClasses reference, as a map namespace -> list of names (JSON),
for the provisioner's Roles: it may read exactly these.
*/}}
{{- define "zerofs-csi.storageClassSecrets" -}}
{{- $byNamespace := dict -}}
{{- range .Values.storageClasses -}}
{{- $namespace := default $.Release.Namespace .secretNamespace -}}
{{- $name := default (include "zerofs-csi.secretName" $) .secretName -}}
{{- $names := get $byNamespace $namespace | default list -}}
{{- if not (has $name $names) -}}
{{- $_ := set $byNamespace $namespace (append $names $name) -}}
{{- end -}}
{{- end -}}
{{- toJson $byNamespace -}}
{{- end -}}

{{/* Pod env of the downward API that the plugin reads. */}}
{{- define "zerofs-csi.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}
