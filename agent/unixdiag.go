package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// unix_diag (linux/unix_diag.h), which x/sys/unix does not define.
const (
	udiagShowPeer    = 0x4 // UDIAG_SHOW_PEER
	unixDiagAttrPeer = 2   // UNIX_DIAG_PEER: the peer's inode, u32

	unixDiagReqLen = 24 // struct unix_diag_req
	unixDiagMsgLen = 16 // struct unix_diag_msg
)

// ErrNoPeer is returned by PeerInode for a socket without a peer.
var ErrNoPeer = errors.New("unix socket has no peer")

var diagSeq atomic.Uint32

// PeerInode returns the inode of conn's socket and the inode of its peer,
// the socket at the other end, as NETLINK_SOCK_DIAG's unix_diag reports it.
// For a connection accepted from a listener, peer is the inode of the
// socket the client called connect() on.
func PeerInode(conn *net.UnixConn) (self, peer uint64, err error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, 0, fmt.Errorf("peer inode: %w", err)
	}
	var st unix.Stat_t
	var statErr error
	if err := raw.Control(func(fd uintptr) { statErr = unix.Fstat(int(fd), &st) }); err != nil {
		return 0, 0, fmt.Errorf("peer inode: %w", err)
	}
	if statErr != nil {
		return 0, 0, fmt.Errorf("peer inode: fstat: %w", statErr)
	}
	peer, err = unixDiagPeer(st.Ino)
	if err != nil {
		return st.Ino, 0, fmt.Errorf("peer inode of socket %d: %w", st.Ino, err)
	}
	return st.Ino, peer, nil
}

// unixDiagPeer asks unix_diag for the peer of the Unix socket with inode ino.
func unixDiagPeer(ino uint64) (uint64, error) {
	if ino > 0xffffffff {
		return 0, fmt.Errorf("inode %d does not fit unix_diag's 32 bits", ino)
	}
	s, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, fmt.Errorf("netlink socket: %w", err)
	}
	defer unix.Close(s)

	seq := diagSeq.Add(1)
	req := make([]byte, unix.NLMSG_HDRLEN+unixDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))         // nlmsg_len
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY) // nlmsg_type
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)       // nlmsg_flags
	ne.PutUint32(req[8:], seq)                      // nlmsg_seq
	r := req[unix.NLMSG_HDRLEN:]                    //
	r[0] = unix.AF_UNIX                             // sdiag_family
	ne.PutUint32(r[4:], ^uint32(0))                 // udiag_states: all
	ne.PutUint32(r[8:], uint32(ino))                // udiag_ino
	ne.PutUint32(r[12:], udiagShowPeer)             // udiag_show
	ne.PutUint32(r[16:], ^uint32(0))                // udiag_cookie: INET_DIAG_NOCOOKIE
	ne.PutUint32(r[20:], ^uint32(0))                //
	if err := unix.Sendto(s, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("unix_diag request: %w", err)
	}

	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(s, buf, 0)
		if err != nil {
			return 0, fmt.Errorf("unix_diag reply: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, fmt.Errorf("unix_diag reply: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if code := int32(ne.Uint32(m.Data)); code != 0 {
						return 0, fmt.Errorf("unix_diag: %w", unix.Errno(-code))
					}
				}
				return 0, errors.New("unix_diag: empty reply")
			case unix.SOCK_DIAG_BY_FAMILY:
				return parseUnixDiagPeer(m.Data, ino)
			}
		}
	}
}

// parseUnixDiagPeer reads UNIX_DIAG_PEER from a unix_diag_msg and its attributes.
func parseUnixDiagPeer(b []byte, ino uint64) (uint64, error) {
	if len(b) < unixDiagMsgLen {
		return 0, fmt.Errorf("unix_diag: short message (%d bytes)", len(b))
	}
	ne := binary.NativeEndian
	if got := ne.Uint32(b[4:]); uint64(got) != ino {
		return 0, fmt.Errorf("unix_diag: reply for inode %d, asked for %d", got, ino)
	}
	attrs := b[unixDiagMsgLen:]
	for len(attrs) >= unix.SizeofRtAttr {
		l := int(ne.Uint16(attrs[0:]))
		typ := ne.Uint16(attrs[2:])
		if l < unix.SizeofRtAttr || l > len(attrs) {
			return 0, fmt.Errorf("unix_diag: bad attribute length %d", l)
		}
		if typ == unixDiagAttrPeer && l >= unix.SizeofRtAttr+4 {
			peer := ne.Uint32(attrs[unix.SizeofRtAttr:])
			if peer == 0 {
				return 0, ErrNoPeer
			}
			return uint64(peer), nil
		}
		al := (l + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1)
		if al > len(attrs) {
			break
		}
		attrs = attrs[al:]
	}
	return 0, ErrNoPeer
}
