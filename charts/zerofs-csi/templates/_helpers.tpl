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
{{- $references := list -}}
{{- range .Values.storageClasses -}}
{{- $references = append $references (dict "name" (default (include "zerofs-csi.secretName" $) .secretName) "namespace" (default $.Release.Namespace .secretNamespace)) -}}
{{- end -}}
{{- $snapshotSecret := include "zerofs-csi.snapshotClassSecret" . | fromJson -}}
{{- if $snapshotSecret.name -}}
{{- $references = append $references $snapshotSecret -}}
{{- end -}}
{{- range $references -}}
{{- $names := get $byNamespace .namespace | default list -}}
{{- if not (has .name $names) -}}
{{- $_ := set $byNamespace .namespace (append $names .name) -}}
{{- end -}}
{{- end -}}
{{- toJson $byNamespace -}}
{{- end -}}

{{/*
The VolumeSnapshotClass's snapshotter secret as {"name", "namespace"} (JSON), name empty
when the class is not rendered or has none: its own values, else the chart's Secret when
the chart has one.
*/}}
{{- define "zerofs-csi.snapshotClassSecret" -}}
{{- $class := dig "volumeSnapshotClass" dict (.Values.snapshots | default dict) -}}
{{- $name := "" -}}
{{- if and (include "zerofs-csi.snapshotsEnabled" .) (dig "create" true $class) -}}
{{- $chartSecret := "" -}}
{{- if or .Values.secret.existingSecret .Values.secret.encryptionPassword -}}
{{- $chartSecret = include "zerofs-csi.secretName" . -}}
{{- end -}}
{{- $name = default $chartSecret (dig "secretName" "" $class) -}}
{{- end -}}
{{- toJson (dict "name" $name "namespace" (default .Release.Namespace (dig "secretNamespace" "" $class))) -}}
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

{{/*
Refuses a StorageClass the driver would refuse, with the driver's words: its s3://
storageUrl (zerofs_csi.volume.settings.StorageUrl), s3Endpoint (ENDPOINT) and
mountOptions (zerofs_csi.host.mount_options.FORBIDDEN_OPTIONS). tests/chart/test_driver_rules.py
runs every rule here against the driver's own. Call with one storageClasses item.
*/}}
{{- define "zerofs-csi.checkStorageClass" -}}
{{- $at := printf "storageClasses[%s]" .name -}}
{{- $url := .storageUrl -}}
{{- $expected := "" -}}
{{- if not (contains "://" $url) -}}
{{- $expected = "a URL such as s3://bucket/path" -}}
{{- else if not (regexMatch `^s3a?://` $url) -}}
{{- $expected = "an s3:// or s3a:// URL (or file:// with the local backend)" -}}
{{- else -}}
{{- $rest := regexReplaceAll `^s3a?://` $url "" -}}
{{- $bucket := regexFind `^[^/]*` $rest -}}
{{- $path := trimPrefix $bucket $rest | trimPrefix "/" | trimSuffix "/" -}}
{{- if or (not (regexMatch `^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$` $bucket)) (contains ".." $bucket) -}}
{{- $expected = "s3://BUCKET[/path] with an S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-'; a letter or digit first and last; no '..')" -}}
{{- else if $path -}}
{{- range splitList "/" $path -}}
{{- if or (not (regexMatch `^[A-Za-z0-9._-]+$` .)) (eq . ".") (eq . "..") -}}
{{- $expected = "a path of non-empty segments of letters, digits, '.', '_' and '-' (no '..', '//', '*' or other characters)" -}}
{{- end -}}
{{- end -}}
{{- if and (not $expected) (gt (len $path) 512) -}}
{{- $expected = "a path of at most 512 characters" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $expected -}}
{{- fail (printf "%s.storageUrl: expected %s; got %q" $at $expected $url) -}}
{{- end -}}
{{- with .s3Endpoint -}}
{{- $port := regexFind `:[0-9]+/?$` . | trimPrefix ":" | trimSuffix "/" -}}
{{- if or (not (regexMatch `^https?://([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?/?$` .)) (and $port (or (lt (atoi $port) 1) (gt (atoi $port) 65535))) -}}
{{- fail (printf "%s.s3Endpoint: expected an http:// or https:// URL of a host name, IPv4 address or [IPv6 address] and an optional port from 1 to 65535, with no path, user or query; got %q" $at .) -}}
{{- end -}}
{{- end -}}
{{- range .mountOptions -}}
{{- range splitList "," . -}}
{{- $word := trim . -}}
{{- if has $word (list "bind" "rbind" "remount" "move" "loop") -}}
{{- fail (printf "%s.mountOptions: mount option '%s' is not allowed" $at $word) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Refuses two ports of one pod that are the same: its containers share the pod's network,
and the second to listen would fail. Call with a list of (value name, port) pairs.
*/}}
{{- define "zerofs-csi.distinctPorts" -}}
{{- $seen := dict -}}
{{- range . -}}
{{- $port := toString (index . 1) -}}
{{- if hasKey $seen $port -}}
{{- fail (printf "%s and %s are both %s: the containers of a pod share its network, and the second to listen would fail with \"Address already in use\"" (get $seen $port) (index . 0) $port) -}}
{{- end -}}
{{- $_ := set $seen $port (index . 0) -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the chart adds its snapshot objects (values snapshots.enabled): always,
never, or (auto) when the cluster serves the snapshot API. Values without snapshots
(an upgrade with --reuse-values from a release before them) mean auto.
*/}}
{{- define "zerofs-csi.snapshotsEnabled" -}}
{{- $enabled := toString (dig "enabled" "auto" (.Values.snapshots | default dict)) -}}
{{- if not (has $enabled (list "auto" "true" "false")) -}}
{{- fail (printf "snapshots.enabled must be auto, true or false (got %q)" $enabled) -}}
{{- end -}}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1/VolumeSnapshotClass")) -}}
true
{{- end -}}
{{- end -}}
