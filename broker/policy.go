package broker

import (
	"path"
	"slices"
	"sort"
	"strings"
)

// Policy decides which identities may use which roles on which upstreams. It
// is pure: the same identity and request always give the same Decision.
type Policy struct {
	principals map[string]Principal
	names      []string                       // sorted principal names
	grants     map[string]map[string][]string // principal → upstream → roles
}

// NewPolicy builds a policy from a validated configuration.
func NewPolicy(principals map[string]Principal, grants []Grant) *Policy {
	p := &Policy{principals: principals, grants: map[string]map[string][]string{}}
	p.names = sortedKeys(principals)
	for _, g := range grants {
		if p.grants[g.Principal] == nil {
			p.grants[g.Principal] = map[string][]string{}
		}
		p.grants[g.Principal][g.Upstream] = append(p.grants[g.Principal][g.Upstream], g.Roles...)
	}
	return p
}

// Decision is the outcome of Authorize.
type Decision struct {
	Allowed   bool
	Principal string   // the principal whose grant allowed it
	Matched   []string // every principal the identity matches, sorted
	// ClaimAttempted and ClaimFailed describe identity matching of a claimed principal.
	ClaimAttempted bool
	ClaimFailed    bool
}

// Matches returns the principals an identity matches, sorted.
func (p *Policy) Matches(id Identity) []string {
	var out []string
	for _, name := range p.names {
		if p.principals[name].Match.match(id) {
			out = append(out, name)
		}
	}
	return out
}

// Authorize decides whether id may use role on upstream. A non-empty claim
// restricts the decision to that principal, which id must match.
func (p *Policy) Authorize(id Identity, upstream, role, claim string) Decision {
	d := Decision{Matched: p.Matches(id)}
	candidates := d.Matched
	if claim != "" {
		d.ClaimAttempted = true
		if !slices.Contains(d.Matched, claim) {
			d.ClaimFailed = true
			return d
		}
		candidates = []string{claim}
	}
	for _, name := range candidates {
		roles := p.grants[name][upstream]
		if slices.Contains(roles, role) || slices.Contains(roles, "*") {
			d.Allowed, d.Principal = true, name
			return d
		}
	}
	return d
}

// Principal returns a defined principal.
func (p *Policy) Principal(name string) (Principal, bool) {
	pr, ok := p.principals[name]
	return pr, ok
}

func (s Selectors) match(id Identity) bool {
	if len(s.UID) > 0 && !slices.Contains(s.UID, id.UID) {
		return false
	}
	if len(s.GID) > 0 && !slices.Contains(s.GID, id.GID) {
		return false
	}
	if len(s.User) > 0 && (id.User == "" || !slices.Contains(s.User, id.User)) {
		return false
	}
	if !matchGlob(s.Exe, id.Exe) || !matchGlob(s.SystemdUnit, id.SystemdUnit) || !matchGlob(s.Cgroup, id.Cgroup) {
		return false
	}
	if len(s.Comm) > 0 && (id.Comm == "" || !slices.Contains(s.Comm, id.Comm)) {
		return false
	}
	if len(s.ContainerID) > 0 && (id.ContainerID == "" || !slices.ContainsFunc(s.ContainerID, func(c string) bool {
		// Accept the short (12-hex) form as docker prints it.
		return c == id.ContainerID || (len(c) >= 12 && strings.HasPrefix(id.ContainerID, c))
	})) {
		return false
	}
	if len(s.K8sNamespace)+len(s.K8sServiceAccount)+len(s.K8sPod)+len(s.K8sLabels) > 0 {
		pod := id.Pod
		if pod == nil {
			return false
		}
		if len(s.K8sNamespace) > 0 && !slices.Contains(s.K8sNamespace, pod.Namespace) {
			return false
		}
		if len(s.K8sServiceAccount) > 0 && !slices.Contains(s.K8sServiceAccount, pod.ServiceAccount) {
			return false
		}
		if !matchGlob(s.K8sPod, pod.Name) {
			return false
		}
		for k, v := range s.K8sLabels {
			if got, ok := pod.Labels[k]; !ok || got != v {
				return false
			}
		}
	}
	return true
}

// matchGlob reports whether value matches any pattern; no patterns match all.
// An empty value matches no pattern: a fact we could not learn never grants.
func matchGlob(patterns []string, value string) bool {
	if len(patterns) == 0 {
		return true
	}
	if value == "" {
		return false
	}
	for _, p := range patterns {
		if p == value {
			return true
		}
		if ok, _ := path.Match(p, value); ok {
			return true
		}
	}
	return false
}

// grantedRoles lists, for an error message, what the matched principals may use on upstream.
func (p *Policy) grantedRoles(principals []string, upstream string) []string {
	var roles []string
	for _, name := range principals {
		roles = append(roles, p.grants[name][upstream]...)
	}
	sort.Strings(roles)
	return slices.Compact(roles)
}
