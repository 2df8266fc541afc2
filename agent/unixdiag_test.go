package agent

import (
	"encoding/binary"
	"errors"
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// unixPair returns the client and the accepted server end of a Unix connection.
func unixPair(t *testing.T) (client, server *net.UnixConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

func sockInode(t *testing.T, c *net.UnixConn) uint64 {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestUnixDiagPeerInode(t *testing.T) {
	client, server := unixPair(t)
	self, peer, err := PeerInode(server)
	if err != nil {
		t.Fatalf("PeerInode: %v", err)
	}
	if want := sockInode(t, server); self != want {
		t.Errorf("self = %d, want %d", self, want)
	}
	if want := sockInode(t, client); peer != want {
		t.Errorf("peer = %d, want the client's socket inode %d", peer, want)
	}
	// And the other way round.
	if self, peer, err := PeerInode(client); err != nil || peer != sockInode(t, server) || self != sockInode(t, client) {
		t.Errorf("PeerInode(client) = %d, %d, %v", self, peer, err)
	}
}

func TestUnixDiagNoPeer(t *testing.T) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "g"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := PeerInode(c); !errors.Is(err, ErrNoPeer) {
		t.Errorf("PeerInode of an unconnected socket: %v, want ErrNoPeer", err)
	}
}

func TestUnixDiagParse(t *testing.T) {
	ne := binary.NativeEndian
	msg := func(ino uint32, attrs ...[]byte) []byte {
		b := make([]byte, unixDiagMsgLen)
		ne.PutUint32(b[4:], ino)
		for _, a := range attrs {
			b = append(b, a...)
		}
		return b
	}
	attr := func(typ uint16, val []byte) []byte {
		b := make([]byte, 4, 8)
		ne.PutUint16(b[0:], uint16(4+len(val)))
		ne.PutUint16(b[2:], typ)
		b = append(b, val...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	u32 := func(v uint32) []byte { return ne.AppendUint32(nil, v) }

	for _, tc := range []struct {
		name    string
		in      []byte
		want    uint64
		wantErr bool
	}{
		{"peer", msg(7, attr(unixDiagAttrPeer, u32(42))), 42, false},
		{"peer after name", msg(7, attr(0, []byte("/x\x00")), attr(unixDiagAttrPeer, u32(43))), 43, false},
		{"no peer", msg(7, attr(0, []byte("/x"))), 0, true},
		{"other inode", msg(8, attr(unixDiagAttrPeer, u32(42))), 0, true},
		{"short", make([]byte, 3), 0, true},
		{"bad attr length", msg(7, []byte{200, 0, 2, 0, 1, 2, 3, 4}), 0, true},
	} {
		got, err := parseUnixDiagPeer(tc.in, 7)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("%s: got %d, %v; want %d, error %v", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

func FuzzUnixDiagParse(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 2, 0, 42, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		parseUnixDiagPeer(b, 7)
	})
}
