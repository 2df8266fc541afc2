package agent

import "testing"

func TestCgroupParsing(t *testing.T) {
	tests := []struct {
		name, proc, path, unit, ctr string
	}{
		{"unified service", "0::/system.slice/billing.service\n", "/system.slice/billing.service", "billing.service", ""},
		{"hybrid uses name=systemd", "12:cpu:/\n1:name=systemd:/system.slice/web.service\n0::/\n", "/system.slice/web.service", "web.service", ""},
		{"user session", "0::/user.slice/user-1000.slice/session-3.scope\n", "/user.slice/user-1000.slice/session-3.scope", "session-3.scope", ""},
		{"user service", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service\n", "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service", "app-foo.service", ""},
		{"docker systemd", "0::/system.slice/docker-" + hex64 + ".scope\n", "/system.slice/docker-" + hex64 + ".scope", "docker-" + hex64 + ".scope", hex64},
		{"containerd kubepods systemd", "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-" + hex64 + ".scope\n", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-" + hex64 + ".scope", "cri-containerd-" + hex64 + ".scope", hex64},
		{"crio", "0::/kubepods.slice/kubepods-pod1.slice/crio-" + hex64 + ".scope\n", "/kubepods.slice/kubepods-pod1.slice/crio-" + hex64 + ".scope", "crio-" + hex64 + ".scope", hex64},
		{"cgroupfs kubepods", "0::/kubepods/besteffort/pod1234/" + hex64 + "\n", "/kubepods/besteffort/pod1234/" + hex64, "", hex64},
		{"docker cgroupfs", "0::/docker/" + hex64 + "\n", "/docker/" + hex64, "", hex64},
		{"root", "0::/\n", "/", "", ""},
		{"garbage", "nonsense", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := CgroupPath([]byte(tt.proc))
			if p != tt.path {
				t.Fatalf("path %q, want %q", p, tt.path)
			}
			if u := SystemdUnit(p); u != tt.unit {
				t.Errorf("unit %q, want %q", u, tt.unit)
			}
			if c := ContainerID(p); c != tt.ctr {
				t.Errorf("container %q, want %q", c, tt.ctr)
			}
		})
	}
}

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func FuzzCgroupPath(f *testing.F) {
	f.Add([]byte("0::/system.slice/billing.service\n"))
	f.Add([]byte("1:name=systemd:/docker/" + hex64 + "\n0::/\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p := CgroupPath(b)
		u := SystemdUnit(p)
		c := ContainerID(p)
		if u != "" && !contains(p, u) {
			t.Fatalf("unit %q not in path %q", u, p)
		}
		if c != "" && (len(c) != 64 || !contains(p, c)) {
			t.Fatalf("container %q from %q", c, p)
		}
	})
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
