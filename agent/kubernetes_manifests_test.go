package agent

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/pgward/pgward/broker"
)

// decodeManifests decodes every document of every deploy/kubernetes file
// strictly (unknown or duplicate fields are errors) into the API types.
func decodeManifests(t *testing.T) map[string][]runtime.Object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("..", "deploy", "kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	out := map[string][]runtime.Object{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			obj, gvk, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s document %d: %v", filepath.Base(f), i, err)
				continue
			}
			t.Logf("%s: %s", filepath.Base(f), gvk.Kind)
			out[filepath.Base(f)] = append(out[filepath.Base(f)], obj)
		}
	}
	return out
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for _, l := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.Bytes()
}

func find[T runtime.Object](objs map[string][]runtime.Object) []T {
	var out []T
	for _, list := range objs {
		for _, o := range list {
			if v, ok := o.(T); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// The decoder really is strict: an unknown field fails.
func TestManifestDecoderIsStrict(t *testing.T) {
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	_, _, err := dec.Decode([]byte("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replica: 2}\n"), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "replica") {
		t.Fatalf("unknown field accepted: %v", err)
	}
}

func TestKubernetesManifests(t *testing.T) {
	objs := decodeManifests(t)
	if t.Failed() {
		return
	}

	// The ConfigMap's pgward.yaml is a valid configuration.
	cms := find[*corev1.ConfigMap](objs)
	if len(cms) != 1 {
		t.Fatalf("%d ConfigMaps", len(cms))
	}
	cfg, err := ParseConfig([]byte(cms[0].Data["pgward.yaml"]), "configmap.yaml:pgward.yaml")
	if err != nil {
		t.Fatalf("the ConfigMap's pgward.yaml: %v", err)
	}
	if !cfg.Kubernetes.Enabled {
		t.Error("the example configuration does not enable pod identity")
	}
	_, metricsPort, _ := net.SplitHostPort(cfg.Metrics.Listen)

	// The DaemonSet: hostPID, only the needed capabilities, probes on the
	// metrics port, the socket directory from the host, NODE_NAME, OTLP.
	dss := find[*appsv1.DaemonSet](objs)
	if len(dss) != 1 {
		t.Fatalf("%d DaemonSets", len(dss))
	}
	ds := dss[0]
	spec := ds.Spec.Template.Spec
	if !spec.HostPID {
		t.Error("hostPID is off: peer pids from other pods would be 0")
	}
	if spec.TerminationGracePeriodSeconds == nil || float64(*spec.TerminationGracePeriodSeconds) <= cfg.Shutdown.Grace.Seconds() {
		t.Errorf("terminationGracePeriodSeconds %v must exceed shutdown.grace %v", spec.TerminationGracePeriodSeconds, cfg.Shutdown.Grace)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers", len(spec.Containers))
	}
	c := spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext.capabilities")
	}
	var add []string
	for _, cp := range sc.Capabilities.Add {
		add = append(add, string(cp))
	}
	slices.Sort(add)
	if want := []string{"BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE"}; !slices.Equal(add, want) {
		t.Errorf("capabilities add %v, want %v", add, want)
	}
	if len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("capabilities drop %v, want [ALL]", sc.Capabilities.Drop)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged container")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation is not false")
	}
	port := ""
	for _, p := range c.Ports {
		if p.Name == "metrics" {
			port = strconv.Itoa(int(p.ContainerPort))
		}
	}
	if port != metricsPort {
		t.Errorf("metrics containerPort %q, metrics.listen port %q", port, metricsPort)
	}
	for name, pr := range map[string]*corev1.Probe{"/readyz": c.ReadinessProbe, "/healthz": c.LivenessProbe} {
		if pr == nil || pr.HTTPGet == nil || pr.HTTPGet.Path != name || pr.HTTPGet.Port.String() != "metrics" {
			t.Errorf("probe for %s: %+v", name, pr)
		}
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME %+v, want fieldRef spec.nodeName", e)
	}
	if env["OTEL_EXPORTER_OTLP_ENDPOINT"].Value == "" {
		t.Error("no OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	if mounts["run"] != cfg.Listen.UnixDir || hostPaths["run"] != "/run/pgward" {
		t.Errorf("socket directory: mounted at %q from host %q; listen.unix_dir %q", mounts["run"], hostPaths["run"], cfg.Listen.UnixDir)
	}
	if mounts["cgroup"] == "" || !strings.HasPrefix(cfg.EBPF.Cgroup, mounts["cgroup"]) {
		t.Errorf("ebpf.cgroup %q is not under the host cgroup mount %q", cfg.EBPF.Cgroup, mounts["cgroup"])
	}
	if !strings.HasPrefix(cfg.Audit.Path, mounts["audit"]+"/") {
		t.Errorf("audit.path %q not on the audit volume %q", cfg.Audit.Path, mounts["audit"])
	}
	if !strings.HasPrefix(cfg.Secrets.File.Path, mounts["secrets"]+"/") {
		t.Errorf("secrets.file.path %q not on the secrets volume %q", cfg.Secrets.File.Path, mounts["secrets"])
	}
	if spec.ServiceAccountName != "pgward" {
		t.Errorf("serviceAccountName %q", spec.ServiceAccountName)
	}

	// RBAC: get/list/watch pods, nothing else.
	roles := find[*rbacv1.ClusterRole](objs)
	if len(roles) != 1 {
		t.Fatalf("%d ClusterRoles", len(roles))
	}
	for _, r := range roles[0].Rules {
		verbs := slices.Clone(r.Verbs)
		slices.Sort(verbs)
		if !slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.Resources, []string{"pods"}) || !slices.Equal(verbs, []string{"get", "list", "watch"}) || len(r.ResourceNames) > 0 {
			t.Errorf("ClusterRole rule %+v grants more than get/list/watch pods", r)
		}
	}
	bindings := find[*rbacv1.ClusterRoleBinding](objs)
	if len(bindings) != 1 || bindings[0].RoleRef.Name != roles[0].Name || bindings[0].Subjects[0].Name != "pgward" || bindings[0].Subjects[0].Namespace != ds.Namespace {
		t.Errorf("ClusterRoleBinding %+v", bindings)
	}

	// The example app mounts the socket directory and is granted through the
	// example policy by its pod identity alone.
	var app *appsv1.Deployment
	for _, d := range find[*appsv1.Deployment](objs) {
		app = d
	}
	if app == nil {
		t.Fatal("no example Deployment")
	}
	ps := app.Spec.Template.Spec
	mounted := false
	for _, v := range ps.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/run/pgward" {
			for _, m := range ps.Containers[0].VolumeMounts {
				mounted = mounted || (m.Name == v.Name && m.MountPath == "/run/pgward")
			}
		}
	}
	if !mounted {
		t.Error("the example app does not mount /run/pgward from the host")
	}
	envs := map[string]string{}
	for _, e := range ps.Containers[0].Env {
		envs[e.Name] = e.Value
	}
	id := broker.Identity{UID: 10001, Pod: &broker.Pod{
		Namespace: app.Namespace, Name: app.Name + "-7c9f8d6b5-x2x4q",
		ServiceAccount: ps.ServiceAccountName, Labels: app.Spec.Template.Labels,
	}}
	policy := broker.NewPolicy(cfg.Principals, cfg.Grants)
	if d := policy.Authorize(id, envs["PGDATABASE"], envs["PGUSER"], ""); !d.Allowed {
		t.Errorf("the example app (%+v) may not use %s on %s under the example policy (matches %v)", id.Pod, envs["PGUSER"], envs["PGDATABASE"], d.Matched)
	}
	id.Pod.Labels = map[string]string{"app": "something-else"}
	if d := policy.Authorize(id, envs["PGDATABASE"], envs["PGUSER"], ""); d.Allowed {
		t.Error("a pod without the app label is granted orders_rw")
	}
}
