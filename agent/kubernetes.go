package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pgward/pgward/broker"
)

// KubernetesConfig turns on pod identity: the container id read from a
// caller's cgroup path is mapped to its pod (namespace, name, service
// account, labels), so principals can use the k8s.* selectors.
type KubernetesConfig struct {
	// Enabled watches the pods of this node. Default false.
	Enabled bool `yaml:"enabled"`
	// NodeName is the node whose pods are watched; default the NODE_NAME
	// environment variable (the DaemonSet sets it from spec.nodeName).
	NodeName string `yaml:"node_name"`
	// Kubeconfig is a kubeconfig file; empty means in-cluster (the pod's
	// service account).
	Kubeconfig string `yaml:"kubeconfig"`
	// LookupWait is how long a connection from a container the pod list
	// does not know yet waits for the watch to catch up (a container that
	// connects the moment it starts may be ahead of the kubelet's status
	// update). Default 2s.
	LookupWait time.Duration `yaml:"lookup_wait"`
}

// DefaultLookupWait is kubernetes.lookup_wait's default.
const DefaultLookupWait = 2 * time.Second

// validate reports kubernetes problems, and k8s.* selectors that could
// never match because pod identity is off.
func (c *Config) validateKubernetes() []error {
	var errs []error
	if c.Kubernetes.LookupWait < 0 {
		errs = append(errs, &broker.FieldError{Path: "kubernetes.lookup_wait", Err: errors.New("must not be negative")})
	}
	if c.Kubernetes.Enabled {
		return errs
	}
	for _, name := range slices.Sorted(maps.Keys(c.Principals)) {
		m := c.Principals[name].Match
		if len(m.K8sNamespace)+len(m.K8sServiceAccount)+len(m.K8sPod)+len(m.K8sLabels) > 0 {
			errs = append(errs, &broker.FieldError{
				Path: "principals." + name + ".match",
				Err:  errors.New("uses k8s.* selectors, which never match while kubernetes.enabled is false"),
			})
		}
	}
	return errs
}

// PodLookup maps a container id (64 hex digits, as ContainerID returns it)
// to the pod the container belongs to.
type PodLookup interface {
	PodFor(containerID string) (*broker.Pod, bool)
}

// PodIndex is a PodLookup fed by a watch on the pods of one node
// (field selector spec.nodeName=<node>): every container id in a pod's
// status (containers, init containers, ephemeral containers) points to the
// pod. Pods of other nodes are never listed, so memory stays proportional
// to the node, not the cluster.
//
// Lifecycle: NewPodIndex builds it; Run watches until its context ends;
// Synced reports whether the first list is in.
type PodIndex struct {
	client   kubernetes.Interface
	node     string
	wait     time.Duration
	log      *slog.Logger
	informer cache.SharedIndexInformer

	mu          sync.Mutex
	byContainer map[string]*broker.Pod
	byPod       map[types.UID][]string // pod → its container ids
	changed     chan struct{}          // closed and replaced on every change
}

// NewPodIndex watches the pods of node through client. wait bounds how long
// PodFor waits for an unknown container id to appear (0: no wait).
func NewPodIndex(client kubernetes.Interface, node string, wait time.Duration, log *slog.Logger) (*PodIndex, error) {
	if node == "" {
		return nil, errors.New("kubernetes: no node name (set kubernetes.node_name or NODE_NAME)")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &PodIndex{
		client:      client,
		node:        node,
		wait:        wait,
		log:         log,
		byContainer: map[string]*broker.Pod{},
		byPod:       map[types.UID][]string{},
		changed:     make(chan struct{}),
	}
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	p.informer = factory.Core().V1().Pods().Informer()
	// Only what identity needs is kept: the rest of the pod spec and status
	// is dropped before it reaches the cache.
	if err := p.informer.SetTransform(trimPod); err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	_, err := p.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { p.upsert(obj) },
		UpdateFunc: func(_, obj any) { p.upsert(obj) },
		DeleteFunc: p.remove,
	})
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	return p, nil
}

// Run watches until ctx ends.
func (p *PodIndex) Run(ctx context.Context) {
	p.informer.RunWithContext(ctx)
}

// Synced reports whether the initial pod list has been indexed.
func (p *PodIndex) Synced() bool { return p.informer.HasSynced() }

// WaitForSync waits for the initial list until ctx ends.
func (p *PodIndex) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), p.informer.HasSynced)
}

// PodFor returns the pod of a container. An id the index does not know is
// waited for up to the configured wait, as a freshly started container may
// connect before its status reaches the API server.
func (p *PodIndex) PodFor(containerID string) (*broker.Pod, bool) {
	if containerID == "" {
		return nil, false
	}
	deadline := time.NewTimer(p.wait)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		pod, ok := p.byContainer[containerID]
		changed := p.changed
		p.mu.Unlock()
		if ok {
			return clonePod(pod), true
		}
		if p.wait <= 0 {
			return nil, false
		}
		select {
		case <-changed:
		case <-deadline.C:
			return nil, false
		}
	}
}

// Len is the number of indexed containers.
func (p *PodIndex) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.byContainer)
}

func (p *PodIndex) upsert(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	// The field selector already restricts the watch to this node; a pod of
	// another node (a misbehaving proxy, the fake clientset) is ignored.
	if pod.Spec.NodeName != p.node {
		p.drop(pod.UID)
		return
	}
	bp := &broker.Pod{
		Namespace:      pod.Namespace,
		Name:           pod.Name,
		ServiceAccount: pod.Spec.ServiceAccountName,
		Labels:         maps.Clone(pod.Labels),
	}
	ids := podContainerIDs(pod)
	p.mu.Lock()
	for _, old := range p.byPod[pod.UID] {
		delete(p.byContainer, old)
	}
	for _, id := range ids {
		p.byContainer[id] = bp
	}
	if len(ids) > 0 {
		p.byPod[pod.UID] = ids
	} else {
		delete(p.byPod, pod.UID)
	}
	p.signalLocked()
	p.mu.Unlock()
}

func (p *PodIndex) remove(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if pod, ok := obj.(*corev1.Pod); ok {
		p.drop(pod.UID)
	}
}

func (p *PodIndex) drop(uid types.UID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range p.byPod[uid] {
		delete(p.byContainer, id)
	}
	delete(p.byPod, uid)
	p.signalLocked()
}

func (p *PodIndex) signalLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// podContainerIDs lists the ids of every container of a pod that has one,
// without the runtime prefix ("containerd://", "cri-o://", "docker://").
func podContainerIDs(pod *corev1.Pod) []string {
	var ids []string
	for _, list := range [][]corev1.ContainerStatus{pod.Status.InitContainerStatuses, pod.Status.ContainerStatuses, pod.Status.EphemeralContainerStatuses} {
		for _, cs := range list {
			if id := stripRuntime(cs.ContainerID); id != "" {
				ids = append(ids, id)
			}
		}
	}
	return ids
}

func stripRuntime(id string) string {
	if _, rest, ok := strings.Cut(id, "://"); ok {
		id = rest
	}
	return strings.ToLower(id)
}

// trimPod keeps only what the index reads.
func trimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	slim := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID,
			Labels: pod.Labels, ResourceVersion: pod.ResourceVersion,
		},
		Spec: corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName},
	}
	slim.Status.InitContainerStatuses = slimStatuses(pod.Status.InitContainerStatuses)
	slim.Status.ContainerStatuses = slimStatuses(pod.Status.ContainerStatuses)
	slim.Status.EphemeralContainerStatuses = slimStatuses(pod.Status.EphemeralContainerStatuses)
	return slim, nil
}

func slimStatuses(in []corev1.ContainerStatus) []corev1.ContainerStatus {
	if len(in) == 0 {
		return nil
	}
	out := make([]corev1.ContainerStatus, 0, len(in))
	for _, cs := range in {
		out = append(out, corev1.ContainerStatus{Name: cs.Name, ContainerID: cs.ContainerID})
	}
	return out
}

func clonePod(p *broker.Pod) *broker.Pod {
	c := *p
	c.Labels = maps.Clone(p.Labels)
	return &c
}

// newKubeClient is kubeClient; tests that cannot pass Options.KubeClient
// replace it.
var newKubeClient = kubeClient

// kubeClient builds a clientset from a kubeconfig file, or in-cluster.
func kubeClient(cfg KubernetesConfig) (kubernetes.Interface, error) {
	var rc *rest.Config
	var err error
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	rc.UserAgent = "pgward"
	c, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}

// startKubernetes watches this node's pods when kubernetes.enabled is set,
// and gives the resolver the pod index. client is for tests; nil builds one
// from the configuration. The watch stops when the agent closes.
func (a *Agent) startKubernetes(client kubernetes.Interface) error {
	kc := a.cfg.Kubernetes
	if !kc.Enabled {
		return nil
	}
	node := kc.NodeName
	if node == "" {
		node = os.Getenv("NODE_NAME")
	}
	if client == nil {
		var err error
		if client, err = newKubeClient(kc); err != nil {
			return err
		}
	}
	idx, err := NewPodIndex(client, node, kc.LookupWait, a.log.With("component", "kubernetes"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		idx.Run(ctx)
	}()
	a.closers = append(a.closers, func() error { cancel(); <-done; return nil })
	a.pods = idx
	a.resolver.Pods = idx
	a.log.Info("kubernetes pod identity on", "node", node)
	return nil
}
