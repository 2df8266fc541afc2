package testenv

import (
	"encoding/binary"
	"fmt"
	"net"

	"github.com/jackc/pgx/v5/pgproto3"
)

// SendCancel sends one CancelRequest for backend pid with the 4-byte secret
// key on a new connection to address (network "unix" or "tcp"), as a client
// with that session's BackendKeyData would, and waits for the server to
// hang up: the protocol has no answer. It returns an error only when it
// cannot connect: a server may hang up before it reads the request (pgward
// does, after too many wrong keys), which is the server's answer, not the
// sender's failure.
func SendCancel(network, address string, pid, key uint32) error {
	c, err := net.Dial(network, address)
	if err != nil {
		return fmt.Errorf("send cancel request: %w", err)
	}
	defer c.Close()
	req := pgproto3.CancelRequest{ProcessID: pid, SecretKey: binary.BigEndian.AppendUint32(nil, key)}
	b, err := req.Encode(nil)
	if err != nil {
		return fmt.Errorf("encode cancel request: %w", err)
	}
	_, _ = c.Write(b)
	_, _ = c.Read(make([]byte, 1))
	return nil
}
