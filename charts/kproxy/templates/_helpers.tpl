{{/* Name of the chart's objects: "kproxy" unless the release says otherwise. */}}
{{- define "kproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The agent's own ConfigMap: the only object it may write (kproxy dsr enable|disable patch it). */}}
{{- define "kproxy.configMapName" -}}
{{- printf "%s-config" (include "kproxy.fullname" .) -}}
{{- end -}}

{{- define "kproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "kproxy.labels" -}}
{{ include "kproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The agent's pin directory: its own directory on the host's bpffs (the bpf-maps volume, /sys/fs/bpf),
never the bpffs root, where other tools (Cilium, Calico, systemd) keep their pins. It is the CLI's default
--bpffs, so `kubectl exec` of `kproxy services`, `stats`... in the agent container needs no flag (and
`kproxy dsr` there stays in cluster mode: an explicit --bpffs or KPROXY_BPFFS would make it standalone).
*/}}
{{- define "kproxy.pinDir" -}}/sys/fs/bpf/kproxy{{- end -}}

{{/*
"true" when the agent destroys connected UDP sockets of removed backends in every network namespace (the
pod gets hostPID, the agent SYS_ADMIN and SYS_PTRACE), "" otherwise: socket LB on,
socketLB.destroyConnectedUDP, and not socketLB.hostNamespaceOnly (pod sockets are then not balanced at the
socket: only the agent's own namespace can hold one to destroy).
*/}}
{{- define "kproxy.destroyConnectedUDP" -}}
{{- if and .Values.socketLB.enabled .Values.socketLB.destroyConnectedUDP (not .Values.socketLB.hostNamespaceOnly) -}}true{{- end -}}
{{- end -}}

{{/* Where the host's cgroup v2 directory is mounted inside the agent container. */}}
{{- define "kproxy.cgroupMountPath" -}}/run/kproxy/cgroupv2{{- end -}}

{{/*
Settings the agent reads once, at start, as flags: ConfigMap key = flag name (map sizes: "map-size.NAME").
Changing any of them changes the pod template's checksum annotation and so rolls the pods. The runtime
settings (dsr-mode) are left out on purpose: the agent watches its ConfigMap and applies them live.
*/}}
{{- define "kproxy.startupConfig" -}}
k8s-api-server: {{ printf "https://%s" (include "kproxy.apiServerHostPort" .) | quote }}
{{- with .Values.interfaces.netdevs }}
netdev: {{ join "," . | quote }}
{{- end }}
pod-ifaces: {{ .Values.interfaces.podInterfaceGlob | quote }}
{{- with .Values.nodePortAddresses }}
nodeport-addresses: {{ join "," . | quote }}
{{- end }}
{{- with .Values.serviceCIDRs }}
service-cidr: {{ join "," . | quote }}
{{- end }}
{{- with .Values.hairpinAddresses }}
hairpin-address: {{ join "," . | quote }}
{{- end }}
node-port-range: {{ .Values.nodePort.range | quote }}
lb-algorithm: {{ .Values.loadBalancer.algorithm | quote }}
acceleration: {{ .Values.loadBalancer.acceleration | quote }}
maglev-table-size: {{ int64 .Values.loadBalancer.maglevTableSize | toString | quote }}
{{- range $name, $size := .Values.mapSizes }}
map-size.{{ $name }}: {{ int64 $size | toString | quote }}
{{- end }}
ct-timeout-syn: {{ int64 .Values.conntrack.synTimeout | toString | quote }}
ct-timeout-tcp: {{ int64 .Values.conntrack.tcpTimeout | toString | quote }}
ct-timeout-fin: {{ int64 .Values.conntrack.finTimeout | toString | quote }}
ct-timeout-udp: {{ int64 .Values.conntrack.udpTimeout | toString | quote }}
ct-timeout-sctp-init: {{ int64 .Values.conntrack.sctpInitTimeout | toString | quote }}
ct-timeout-sctp: {{ int64 .Values.conntrack.sctpTimeout | toString | quote }}
ct-timeout-sctp-close: {{ int64 .Values.conntrack.sctpCloseTimeout | toString | quote }}
log-level: {{ .Values.logLevel | quote }}
metrics-bind-address: {{ include "kproxy.hostPort" (list .Values.metrics.bindAddress .Values.metrics.port) | quote }}
health-bind-address: {{ include "kproxy.hostPort" (list "0.0.0.0" .Values.healthPort) | quote }}
{{- if .Values.socketLB.enabled }}
socket-lb-cgroup: {{ include "kproxy.cgroupMountPath" . | quote }}
{{- end }}
{{- end -}}

{{/* Settings the agent follows live from its ConfigMap. */}}
{{- define "kproxy.runtimeConfig" -}}
dsr-mode: {{ ternary .Values.dsr.mode "off" .Values.dsr.enabled | quote }}
{{- end -}}

{{/* "host:port", bracketing IPv6 literals. */}}
{{- define "kproxy.hostPort" -}}
{{- $host := index . 0 -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int64 (index . 1)) -}}
{{- else -}}
{{- printf "%s:%d" $host (int64 (index . 1)) -}}
{{- end -}}
{{- end -}}

{{- define "kproxy.apiServerHostPort" -}}
{{- include "kproxy.hostPort" (list .Values.k8sServiceHost .Values.k8sServicePort) -}}
{{- end -}}

{{/* Environment variable carrying one ConfigMap key: KPROXY_CFG_ + the key in upper snake case. */}}
{{- define "kproxy.envName" -}}
{{- printf "KPROXY_CFG_%s" (. | upper | replace "-" "_" | replace "." "_") -}}
{{- end -}}

{{/* The command-line flag for one ConfigMap key. */}}
{{- define "kproxy.flagFor" -}}
{{- if hasPrefix "map-size." . -}}
{{- printf "--map-size=%s=$(%s)" (trimPrefix "map-size." .) (include "kproxy.envName" .) -}}
{{- else -}}
{{- printf "--%s=$(%s)" . (include "kproxy.envName" .) -}}
{{- end -}}
{{- end -}}

{{/*
securityContext of one container: the named capabilities and nothing else, or privileged when the
admin opted in with `privileged: true`.
*/}}
{{- define "kproxy.securityContext" -}}
{{- $ctx := index . 0 -}}
{{- $caps := index . 1 -}}
{{- if $ctx.Values.privileged }}
privileged: true
{{- else }}
privileged: false
{{- if not (has "SYS_ADMIN" $caps) }}
{{- /* The API rejects allowPrivilegeEscalation: false together with SYS_ADMIN. */}}
allowPrivilegeEscalation: false
{{- end }}
capabilities:
  drop:
    - ALL
  add:
  {{- range $caps }}
    - {{ . }}
  {{- end }}
{{- end }}
{{- end -}}
