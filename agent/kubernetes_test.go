package agent

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// Container ids as the runtimes write them in /proc/<pid>/cgroup
// (testdata/cgroups) and as the kubelet reports them in the pod status.
var cgroupFixtures = []struct {
	file, statusID, id string
}{
	{"containerd-systemd", "containerd://3f1c9a7e5b2d4c8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f", "3f1c9a7e5b2d4c8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f"},
	{"containerd-cgroupfs", "containerd://9b8e3c0a1d2f4e5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b", "9b8e3c0a1d2f4e5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"},
	{"crio-systemd", "cri-o://41d7f0c2b9e84a6d8c3f5e1a7b9d2c4e6f8a0b1c3d5e7f9a2b4c6d8e0f1a3b5c", "41d7f0c2b9e84a6d8c3f5e1a7b9d2c4e6f8a0b1c3d5e7f9a2b4c6d8e0f1a3b5c"},
	{"cri-dockerd-systemd", "docker://e5a1b9c3d7f2e6a0b4c8d2f6e0a4b8c2d6f0e4a8b2c6d0f4e8a2b6c0d4f8e2a6", "e5a1b9c3d7f2e6a0b4c8d2f6e0a4b8c2d6f0e4a8b2c6d0f4e8a2b6c0d4f8e2a6"},
	{"containerd-cgroupv1-hybrid", "containerd://0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d", "0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d"},
	{"k3s-containerd", "containerd://7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b", "7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b"},
	{"host-service", "", ""},
}

func TestContainerIDFromCgroupFixtures(t *testing.T) {
	for _, fx := range cgroupFixtures {
		t.Run(fx.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", "cgroups", fx.file))
			if err != nil {
				t.Fatal(err)
			}
			if got := ContainerID(CgroupPath(b)); got != fx.id {
				t.Fatalf("container id %q, want %q", got, fx.id)
			}
			if fx.statusID != "" && stripRuntime(fx.statusID) != fx.id {
				t.Fatalf("status id %q → %q, want %q", fx.statusID, stripRuntime(fx.statusID), fx.id)
			}
		})
	}
}

func testPod(ns, name, node string, labels map[string]string, ids ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(ns + "/" + name), Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: name + "-sa"},
	}
	for i, id := range ids {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{Name: "c" + strconv.Itoa(i), ContainerID: id})
	}
	return p
}

// startIndex runs a PodIndex over a fake clientset until the test ends.
func startIndex(t *testing.T, client *fake.Clientset, wait time.Duration) *PodIndex {
	t.Helper()
	idx, err := NewPodIndex(client, "node-a", wait, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); idx.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	if !idx.WaitForSync(sctx) {
		t.Fatal("pod index never synced")
	}
	return idx
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPodIndexWatch(t *testing.T) {
	ids := make([]string, len(cgroupFixtures))
	for i, fx := range cgroupFixtures {
		ids[i] = fx.id
	}
	// One pod exists before the watch starts: the initial list finds it.
	client := fake.NewClientset(testPod("shop", "api-1", "node-a", map[string]string{"app": "api"}, cgroupFixtures[0].statusID))
	idx := startIndex(t, client, 0)
	ctx := context.Background()

	// The list and the watch ask for this node's pods only. WaitForSync
	// returns once the list is in; the watch starts after it, so the
	// test waits for it to be recorded instead of reading the actions
	// once (CI saw only the list, 1 run in ~20).
	var selectors []string
	restrictions := func() []string {
		var out []string
		for _, a := range client.Actions() {
			switch a := a.(type) {
			case k8stesting.ListAction:
				out = append(out, "list "+a.GetListRestrictions().Fields.String())
			case k8stesting.WatchAction:
				out = append(out, "watch "+a.GetWatchRestrictions().Fields.String())
			}
		}
		return out
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		selectors = restrictions()
		joined := strings.Join(selectors, ",")
		if strings.Contains(joined, "list spec.nodeName=node-a") && strings.Contains(joined, "watch spec.nodeName=node-a") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("list/watch restrictions %q, want spec.nodeName=node-a on both", selectors)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, s := range selectors {
		if !strings.HasSuffix(s, " spec.nodeName=node-a") {
			t.Fatalf("list/watch restriction %q, want spec.nodeName=node-a on every one (all: %q)", s, selectors)
		}
	}

	pod, ok := idx.PodFor(ids[0])
	if !ok || pod.Namespace != "shop" || pod.Name != "api-1" || pod.ServiceAccount != "api-1-sa" || pod.Labels["app"] != "api" {
		t.Fatalf("initial pod: %+v %v", pod, ok)
	}

	// Add: a pod with several containers, runtime prefixes of each runtime.
	multi := testPod("billing", "worker-7", "node-a", map[string]string{"app": "worker", "tier": "batch"},
		cgroupFixtures[1].statusID, cgroupFixtures[2].statusID)
	multi.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: "init", ContainerID: cgroupFixtures[3].statusID}}
	if _, err := client.CoreV1().Pods("billing").Create(ctx, multi, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids[1:4] {
		eventually(t, "container "+id[:12], func() bool {
			p, ok := idx.PodFor(id)
			return ok && p.Name == "worker-7" && p.Labels["tier"] == "batch"
		})
	}

	// A pod of another node is not this node's business.
	if _, err := client.CoreV1().Pods("shop").Create(ctx, testPod("shop", "elsewhere", "node-b", nil, cgroupFixtures[4].statusID), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Update: a restarted container gets a new id; labels change.
	multi.Labels["tier"] = "online"
	multi.Status.ContainerStatuses[1].ContainerID = cgroupFixtures[5].statusID
	if _, err := client.CoreV1().Pods("billing").Update(ctx, multi, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the update", func() bool {
		p, ok := idx.PodFor(ids[5])
		return ok && p.Labels["tier"] == "online"
	})
	if _, ok := idx.PodFor(ids[2]); ok {
		t.Fatal("the replaced container id still maps to the pod")
	}
	if p, _ := idx.PodFor(ids[1]); p == nil || p.Labels["tier"] != "online" {
		t.Fatalf("other container of the updated pod: %+v", p)
	}
	if _, ok := idx.PodFor(ids[4]); ok {
		t.Fatal("a pod of node-b was indexed")
	}
	// A caller cannot change the index through the pod it got.
	p, _ := idx.PodFor(ids[1])
	p.Labels["tier"] = "forged"
	if p2, _ := idx.PodFor(ids[1]); p2.Labels["tier"] != "online" {
		t.Fatal("PodFor returned the index's own labels map")
	}

	// Delete.
	if err := client.CoreV1().Pods("billing").Delete(ctx, "worker-7", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the delete", func() bool { _, ok := idx.PodFor(ids[1]); return !ok })
	for _, id := range []string{ids[3], ids[5]} {
		if _, ok := idx.PodFor(id); ok {
			t.Fatalf("container %s of a deleted pod still maps", id[:12])
		}
	}
	if idx.Len() != 1 {
		t.Fatalf("%d containers indexed, want 1 (api-1)", idx.Len())
	}
	if _, ok := idx.PodFor(""); ok {
		t.Fatal("the empty container id matched")
	}
}

// A container that connects before its status reaches the API server is
// waited for, up to the lookup wait.
func TestPodIndexWaitsForNewContainer(t *testing.T) {
	client := fake.NewClientset()
	idx := startIndex(t, client, 3*time.Second)
	id := cgroupFixtures[0].id
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, _ = client.CoreV1().Pods("shop").Create(context.Background(), testPod("shop", "late", "node-a", nil, cgroupFixtures[0].statusID), metav1.CreateOptions{})
	}()
	start := time.Now()
	p, ok := idx.PodFor(id)
	if !ok || p.Name != "late" {
		t.Fatalf("late pod: %+v %v", p, ok)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("found after %v", d)
	}
	start = time.Now()
	if _, ok := idx.PodFor(cgroupFixtures[1].id); ok {
		t.Fatal("an unknown container matched")
	}
	if d := time.Since(start); d < 3*time.Second || d > 5*time.Second {
		t.Fatalf("gave up after %v, want the 3s lookup wait", d)
	}
}

// Through the resolver and the policy: a fake /proc whose process is in a
// pod's container gets the pod, and k8s.* principals match on it.
func TestPodIdentityMatchesPolicy(t *testing.T) {
	client := fake.NewClientset(
		testPod("shop", "api-6d9f", "node-a", map[string]string{"app": "api", "team": "shop"}, cgroupFixtures[0].statusID),
		testPod("shop", "cron-1", "node-a", map[string]string{"app": "cron"}, cgroupFixtures[2].statusID),
	)
	idx := startIndex(t, client, 0)
	proc := t.TempDir()
	for pid, fx := range map[int]string{100: "containerd-systemd", 200: "crio-systemd", 300: "host-service", 400: "containerd-cgroupfs"} {
		dir := filepath.Join(proc, strconv.Itoa(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join("testdata", "cgroups", fx))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup"), b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "comm"), []byte("app\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := &Resolver{ProcRoot: proc, Pods: idx}
	policy := broker.NewPolicy(map[string]broker.Principal{
		"shop-api": {Match: broker.Selectors{K8sNamespace: broker.StringList{"shop"}, K8sLabels: map[string]string{"app": "api"}}},
		"shop-sa":  {Match: broker.Selectors{K8sServiceAccount: broker.StringList{"cron-1-sa"}, K8sPod: broker.StringList{"cron-*"}}},
	}, []broker.Grant{
		{Principal: "shop-api", Upstream: "orders", Roles: []string{"orders_rw"}},
		{Principal: "shop-sa", Upstream: "orders", Roles: []string{"orders_ro"}},
	})
	tests := []struct {
		pid            int32
		pod            string
		rw, ro         bool
		wantPrincipals string
	}{
		{100, "shop/api-6d9f", true, false, "shop-api"},
		{200, "shop/cron-1", false, true, "shop-sa"},
		{300, "", false, false, ""}, // a host service: no pod, k8s selectors never match
		{400, "", false, false, ""}, // a container of no known pod
	}
	for _, tt := range tests {
		t.Run(strconv.Itoa(int(tt.pid)), func(t *testing.T) {
			id := broker.Identity{PID: tt.pid, UID: 1000}
			if !r.fillFromProc(&id, -1) {
				t.Fatal("process reported gone")
			}
			got := ""
			if id.Pod != nil {
				got = id.Pod.Namespace + "/" + id.Pod.Name
			}
			if got != tt.pod {
				t.Fatalf("pod %q, want %q (container %q)", got, tt.pod, id.ContainerID)
			}
			if d := policy.Authorize(id, "orders", "orders_rw", ""); d.Allowed != tt.rw {
				t.Errorf("orders_rw allowed=%v, want %v", d.Allowed, tt.rw)
			}
			if d := policy.Authorize(id, "orders", "orders_ro", ""); d.Allowed != tt.ro {
				t.Errorf("orders_ro allowed=%v, want %v", d.Allowed, tt.ro)
			}
			if m := strings.Join(policy.Matches(id), ","); m != tt.wantPrincipals {
				t.Errorf("principals %q, want %q", m, tt.wantPrincipals)
			}
		})
	}
}

func TestKubernetesConfig(t *testing.T) {
	base := `listen: { unix_dir: /run/pgward }
upstreams: { orders: { address: /var/run/postgresql/.s.PGSQL.5432 } }
secrets: { backend: env }
principals:
  api:
    match: { k8s.namespace: [shop], k8s.labels: { app: api } }
grants:
  - { principal: api, upstream: orders, roles: [orders_rw] }
audit: { path: /var/log/pgward/audit.jsonl }
`
	_, err := ParseConfig([]byte(base), "pgward.yaml")
	if err == nil || !strings.Contains(err.Error(), "pgward.yaml:6: principals.api.match") || !strings.Contains(err.Error(), "kubernetes.enabled is false") {
		t.Fatalf("k8s selectors without kubernetes.enabled: %v", err)
	}
	cfg, err := ParseConfig([]byte(base+"kubernetes: { enabled: true, node_name: node-a, kubeconfig: /etc/kube.conf, lookup_wait: 500ms }\n"), "pgward.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if k := cfg.Kubernetes; !k.Enabled || k.NodeName != "node-a" || k.Kubeconfig != "/etc/kube.conf" || k.LookupWait != 500*time.Millisecond {
		t.Fatalf("kubernetes config %+v", k)
	}
	_, err = ParseConfig([]byte(base+"kubernetes: { enabled: true, lookup_wait: -1s, nodename: x }\n"), "pgward.yaml")
	if err == nil || !strings.Contains(err.Error(), "nodename") {
		t.Fatalf("unknown key: %v", err)
	}
	if (&Config{}).WithDefaults().Kubernetes.LookupWait != DefaultLookupWait {
		t.Fatal("default lookup wait")
	}
}

// End to end on the kernel: psql runs in a cgroup named like a containerd
// container; the fake API server knows the pod; a principal that selects
// only on k8s.namespace and k8s.labels lets it in, and the audit record
// carries the pod.
func TestKubernetesPodIdentityEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	id := cgroupFixtures[0].id
	cg := testenv.NewCgroup(t, "").Child(t, "cri-containerd-"+id+".scope")
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	client := fake.NewClientset(testPod("shop", "api-6d9f", "node-a", map[string]string{"app": "api"}, "containerd://"+id))
	h := newHarness(t, func(h *harness, c *Config) {
		c.Kubernetes = KubernetesConfig{Enabled: true, NodeName: "node-a"}
		c.Principals["shop-api"] = broker.Principal{Match: broker.Selectors{K8sNamespace: broker.StringList{"shop"}, K8sLabels: map[string]string{"app": "api"}}}
		c.Grants = append(c.Grants, broker.Grant{Principal: "shop-api", Upstream: "orders", Roles: []string{testenv.ScramUser}})
		newKubeClient = func(KubernetesConfig) (kubernetes.Interface, error) { return client, nil }
	})
	newKubeClient = kubeClient
	eventually(t, "/readyz ready", func() bool {
		resp, err := http.Get("http://" + h.agent.MetricsAddr().String() + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	out, err := psqlIn(t, cg, uid, h.dsn(testenv.ScramUser, "orders"))
	if err != nil || out != testenv.ScramUser {
		t.Fatalf("psql in the pod's container: %v %s", err, out)
	}
	ev := findEvent(t, h, "db.session.start", func(ev map[string]any) bool { return ev["principal"] == "shop-api" })
	proc, _ := ev["process"].(map[string]any)
	pod, _ := proc["pod"].(map[string]any)
	if proc["container_id"] != id || fmt.Sprint(pod["namespace"]) != "shop" || fmt.Sprint(pod["name"]) != "api-6d9f" {
		t.Fatalf("audit process %v", proc)
	}
	// The same uid outside the container has no pod, and no grant.
	raw, err := testenv.RunAs(uid, uid, "psql", "-XAt", "-c", "select 1", h.dsn(testenv.ScramUser, "orders")).CombinedOutput()
	if err == nil || !strings.Contains(string(raw), "no grant") {
		t.Fatalf("psql outside the container: %v %s", err, raw)
	}
}
