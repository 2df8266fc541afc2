package broker

import "testing"

// Login slots: per uid and per cgroup, never the root cgroup, given back
// once; unknown peers (the TCP listener) only count against max_connections.
func TestSlotTable(t *testing.T) {
	var st slotTable
	a := peerKey{known: true, uid: 1001, cgroup: "/system.slice/a.service"}
	var rels []func()
	for range 3 {
		rel, reason, _ := st.acquire(a, 3, 0)
		if reason != "" {
			t.Fatalf("refused within the share: %s", reason)
		}
		rels = append(rels, rel)
	}
	if _, reason, limit := st.acquire(a, 3, 0); reason != SlotPerUID || limit != 3 {
		t.Fatalf("fourth login of uid 1001: %q %d, want per_uid 3", reason, limit)
	}
	// Another uid is untouched.
	if _, reason, _ := st.acquire(peerKey{known: true, uid: 1002, cgroup: "/"}, 3, 0); reason != "" {
		t.Fatalf("uid 1002: %s", reason)
	}
	rels[0]()
	rels[0]() // idempotent
	if n := st.loginSlots(1001); n != 2 {
		t.Fatalf("uid 1001 holds %d slots after one release, want 2", n)
	}
	// Per cgroup across uids; the root cgroup is never limited.
	b := peerKey{known: true, uid: 2001, cgroup: "/kubepods/pod1"}
	c := peerKey{known: true, uid: 2002, cgroup: "/kubepods/pod1"}
	if _, reason, _ := st.acquire(b, 10, 1); reason != "" {
		t.Fatal(reason)
	}
	if _, reason, _ := st.acquire(c, 10, 1); reason != SlotPerCgroup {
		t.Fatalf("second uid in a full cgroup: %q, want per_cgroup", reason)
	}
	for i := range 5 {
		if _, reason, _ := st.acquire(peerKey{known: true, uid: uint32(3000 + i), cgroup: "/"}, 10, 1); reason != "" {
			t.Fatalf("root cgroup limited: %s", reason)
		}
	}
	for range 5 {
		if _, reason, _ := st.acquire(peerKey{}, 1, 1); reason != "" {
			t.Fatalf("unknown peer limited: %s", reason)
		}
	}
}
