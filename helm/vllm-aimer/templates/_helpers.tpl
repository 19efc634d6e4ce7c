{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "vllm-aimer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already
contains the chart name.
*/}}
{{- define "vllm-aimer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "vllm-aimer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (Deployment selectors are immutable).
*/}}
{{- define "vllm-aimer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-aimer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels on every object.
*/}}
{{- define "vllm-aimer.labels" -}}
helm.sh/chart: {{ include "vllm-aimer.chart" . }}
{{ include "vllm-aimer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: vllm-aimer
{{- end }}

{{/*
Name of the model claim: the existing one, or the one this chart creates.
Empty when the model comes from the hub.
*/}}
{{- define "vllm-aimer.modelClaim" -}}
{{- if .Values.model.pvc.existingClaim }}
{{- .Values.model.pvc.existingClaim }}
{{- else if .Values.model.pvc.create }}
{{- printf "%s-models" (include "vllm-aimer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Where a hub model is downloaded to (on the cache volume) before the server starts:
the AIMER loader reads the checkpoint's files directly, so it needs a local directory.
*/}}
{{- define "vllm-aimer.downloadDir" -}}
{{- printf "%s/%s" (.Values.model.download.dir | trimSuffix "/") .Values.model.id }}
{{- end }}

{{/*
What `vllm serve` is given as the model: the checkpoint directory on the
claim, or the directory the hub model was downloaded to.
*/}}
{{- define "vllm-aimer.model" -}}
{{- if include "vllm-aimer.modelClaim" . }}
{{- $mount := .Values.model.pvc.mountPath | trimSuffix "/" }}
{{- if .Values.model.path }}
{{- printf "%s/%s" $mount (.Values.model.path | trimPrefix "/") }}
{{- else }}
{{- $mount }}
{{- end }}
{{- else }}
{{- $_ := required "set model.id (a hub id) or model.pvc.existingClaim / model.pvc.create (a checkpoint on a volume)" .Values.model.id }}
{{- include "vllm-aimer.downloadDir" . }}
{{- end }}
{{- end }}

{{/*
The name clients request and /metrics labels (model_name): servedModelName,
else the hub id for a hub model (as vLLM would name it), else vLLM's default.
*/}}
{{- define "vllm-aimer.servedModelName" -}}
{{- if .Values.servedModelName }}
{{- .Values.servedModelName }}
{{- else if not (include "vllm-aimer.modelClaim" .) }}
{{- .Values.model.id }}
{{- end }}
{{- end }}

{{/* Where a plan from a ConfigMap is mounted. */}}
{{- define "vllm-aimer.planDir" -}}
/etc/vllm-aimer/plan
{{- end }}

{{/*
The --model-loader-extra-config object as JSON: prune_ratio or plan, plus
plan_out and the loader options. Rendered with toJson so it is always valid JSON.
*/}}
{{- define "vllm-aimer.loaderExtraConfig" -}}
{{- $p := .Values.pruning }}
{{- $cfg := dict }}
{{- range $k, $v := ($p.loaderOptions | default dict) }}
{{- $_ := set $cfg $k $v }}
{{- end }}
{{- $hasRatio := and (hasKey $p "ratio") (not (kindIs "invalid" $p.ratio)) }}
{{- if and $p.planConfigMap $p.planConfigMap.name }}
{{- if $hasRatio }}
{{- fail "pruning.ratio and pruning.planConfigMap are exclusive: a plan already fixes which experts are pruned" }}
{{- end }}
{{- $_ := set $cfg "plan" (printf "%s/%s" (include "vllm-aimer.planDir" .) $p.planConfigMap.key) }}
{{- else if $hasRatio }}
{{- $_ := set $cfg "prune_ratio" $p.ratio }}
{{- else }}
{{- $_ := set $cfg "prune_ratio" 0.5 }}
{{- end }}
{{- if $p.planOut }}
{{- $_ := set $cfg "plan_out" $p.planOut }}
{{- end }}
{{- toJson $cfg }}
{{- end }}

{{/*
Environment for a read-only root filesystem: every cache under /cache (the
image sets the same; repeated so other images work too).
*/}}
{{- define "vllm-aimer.cacheEnv" -}}
- name: HOME
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: XDG_CACHE_HOME
  value: /cache/xdg
- name: XDG_CONFIG_HOME
  value: /cache/config
- name: VLLM_CACHE_ROOT
  value: /cache/vllm
- name: VLLM_CONFIG_ROOT
  value: /cache/config/vllm
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /cache/torchinductor
- name: CUDA_CACHE_PATH
  value: /cache/nv
- name: FLASHINFER_WORKSPACE_BASE
  value: /cache/flashinfer
- name: NUMBA_CACHE_DIR
  value: /cache/numba
- name: OUTLINES_CACHE_DIR
  value: /cache/outlines
- name: TMPDIR
  value: /tmp
{{- end }}

{{/*
Seconds vLLM's API server waits for the engine (VLLM_ENGINE_READY_TIMEOUT_S, 600 by
default): the startup probe's whole budget, initialDelaySeconds + periodSeconds x
failureThreshold (Kubernetes defaults 0, 10, 3). Empty when there is no startup probe
or env sets the variable itself.
*/}}
{{- define "vllm-aimer.engineReadyTimeout" -}}
{{- $userSet := false -}}
{{- range .Values.env -}}
{{- if eq (.name | default "") "VLLM_ENGINE_READY_TIMEOUT_S" -}}{{- $userSet = true -}}{{- end -}}
{{- end -}}
{{- with .Values.startupProbe -}}
{{- if not $userSet -}}
{{- add (int (.initialDelaySeconds | default 0)) (mul (int (.periodSeconds | default 10)) (int (.failureThreshold | default 3))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
