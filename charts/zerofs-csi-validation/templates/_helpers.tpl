{{- define "validation.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "validation.claim" -}}
{{- printf "%s-check" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A test pod on the check volume: call with (dict "root" $ "step" "write" "weight" 0). */}}
{{- define "validation.testPod" -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-%s" .root.Release.Name .step | trunc 63 | trimSuffix "-" }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "validation.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .step }}
  annotations:
    helm.sh/hook: test
    # Helm runs test pods one after the other in this order, each to completion: the
    # volume is unstaged between them, so verify reads what came back from the store.
    helm.sh/hook-weight: {{ .weight | quote }}
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  restartPolicy: Never
  activeDeadlineSeconds: {{ .root.Values.check.timeoutSeconds }}
  {{- with .root.Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .root.Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .step }}
      image: {{ printf "%s:%s" .root.Values.image.repository .root.Values.image.tag }}
      imagePullPolicy: {{ .root.Values.image.pullPolicy }}
      command: ["/bin/sh", "/scripts/{{ .step }}.sh"]
      env:
        - name: FILES
          value: {{ .root.Values.check.files | quote }}
        - name: FILE_MIB
          value: {{ .root.Values.check.fileMiB | quote }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: scripts
          mountPath: /scripts
          readOnly: true
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "validation.claim" .root }}
    - name: scripts
      configMap:
        name: {{ printf "%s-scripts" .root.Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}
