package broker

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// However the server's bytes are split into reads, a Frontend reading the
// login through a loginReader stops at ReadyForQuery holding nothing, and
// rest plus what is still unread is exactly what the server sent behind it.
func TestLoginReaderKeepsBytesBehindReadyForQuery(t *testing.T) {
	var login []byte
	for _, m := range []pgproto3.BackendMessage{
		&pgproto3.AuthenticationOk{},
		&pgproto3.ParameterStatus{Name: "server_version", Value: "17.0"},
		&pgproto3.ParameterStatus{Name: "application_name", Value: string(bytes.Repeat([]byte{'a'}, 9000))},
		&pgproto3.BackendKeyData{ProcessID: 7, SecretKey: []byte{0, 0, 0, 9}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
	} {
		login, _ = m.Encode(login)
	}
	var behind []byte
	for _, m := range []pgproto3.BackendMessage{
		&pgproto3.NoticeResponse{Severity: "NOTICE", Code: "01000", Message: "behind"},
		&pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating"},
	} {
		behind, _ = m.Encode(behind)
	}
	behind = append(behind, 'D', 0, 0) // and the start of a message cut mid-header
	stream := append(append([]byte(nil), login...), behind...)

	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 1))
		client, server := net.Pipe()
		go func() {
			defer server.Close()
			for s := stream; len(s) > 0; {
				k := min(len(s), 1+rng.IntN(64))
				if seed%4 == 0 {
					k = len(s) // all in one write
				}
				if _, err := server.Write(s[:k]); err != nil {
					return
				}
				s = s[k:]
			}
		}()
		lr := newLoginReader(client)
		fe := pgproto3.NewFrontend(lr, client)
		for {
			m, err := fe.Receive()
			if err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			if _, ok := m.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
		if n := fe.ReadBufferLen(); n != 0 {
			t.Fatalf("seed %d: the Frontend holds %d bytes past ReadyForQuery", seed, n)
		}
		got := bytes.Clone(lr.rest())
		lr.release()
		more, err := io.ReadAll(client)
		if err != nil {
			t.Fatal(err)
		}
		client.Close()
		if got = append(got, more...); !bytes.Equal(got, behind) {
			t.Fatalf("seed %d: after ReadyForQuery got %q, want %q", seed, got, behind)
		}
	}
}

// A relayReader seeded with bytes reports them on its first read without
// reading, whatever their size, then reads on.
func TestRelayReaderSeed(t *testing.T) {
	for _, size := range []int{1, 100, relayBufSize, relayBufSize + 1} {
		client, server := net.Pipe()
		go func() {
			_, _ = server.Write([]byte("next"))
			server.Close()
		}()
		rd := newRelayReader(client, &bufferBudget{})
		pre := bytes.Repeat([]byte{'x'}, size)
		rd.seed(pre)
		n, err := rd.read()
		if err != nil || n != size || !bytes.Equal(rd.pending(), pre) {
			t.Fatalf("size %d: first read %d %v", size, n, err)
		}
		rd.consume(n)
		n, err = rd.read()
		if err != nil || string(rd.pending()) != "next" {
			t.Fatalf("size %d: second read %d %q %v", size, n, rd.pending(), err)
		}
		rd.release()
		client.Close()
	}
}
