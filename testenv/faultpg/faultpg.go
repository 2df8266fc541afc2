// Package faultpg is a scripted fake PostgreSQL server for the misbehaviour
// a real server will not produce: bytes injected after the TLS 'S' answer
// (CVE-2021-23214/23222), messages with absurd lengths, a server that hangs
// mid-startup. Each accepted connection runs the test's Script.
//
// It is a test helper: a TCP listener on 127.0.0.1 and one goroutine per
// connection, all stopped by Close (or the test's cleanup). It does not
// speak the protocol beyond what a script asks for.
package faultpg

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Script runs one accepted connection of s. The server closes conn after
// it returns.
type Script func(s *Server, conn net.Conn) error

// Server is a fake PostgreSQL server.
type Server struct {
	ln     net.Listener
	script Script
	wg     sync.WaitGroup

	accepted atomic.Int64
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	errs     []error
	got      [][]byte // startup packets read by ReadStartup, in order
}

// Start listens on 127.0.0.1 and runs script for every connection. The
// test's cleanup closes it.
func Start(tb testing.TB, script Script) *Server {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s := &Server{ln: ln, script: script, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.serve()
	tb.Cleanup(s.Close)
	return s
}

// Addr is host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Accepted is the number of connections accepted so far.
func (s *Server) Accepted() int64 { return s.accepted.Load() }

// Errs are the errors scripts returned.
func (s *Server) Errs() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.errs...)
}

// Close stops accepting, closes every connection and waits for the scripts.
func (s *Server) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.accepted.Add(1)
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			err := s.script(s, c)
			c.Close()
			s.mu.Lock()
			delete(s.conns, c)
			if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.errs = append(s.errs, err)
			}
			s.mu.Unlock()
		}()
	}
}

// Startup-phase codes.
const (
	SSLRequest    = 80877103
	GSSENCRequest = 80877104
)

// ReadPacket reads one length-prefixed startup-phase packet and returns its
// code (the first 4 bytes of the body) and body.
func ReadPacket(c net.Conn) (code uint32, body []byte, err error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 8 || n > 10000 {
		return 0, nil, fmt.Errorf("faultpg: startup packet length %d", n)
	}
	body = make([]byte, n-4)
	if _, err := io.ReadFull(c, body); err != nil {
		return 0, nil, err
	}
	return binary.BigEndian.Uint32(body), body, nil
}

// Message encodes one backend message.
func Message(typ byte, body ...[]byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	for _, p := range body {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint32(b[1:], uint32(len(b)-1))
	return b
}

// AuthOKReady is AuthenticationOk, BackendKeyData and ReadyForQuery: what
// an attacker injects to skip authentication.
func AuthOKReady() []byte {
	b := Message('R', []byte{0, 0, 0, 0})
	b = append(b, Message('K', []byte{0, 0, 0, 1, 0, 0, 0, 2})...)
	return append(b, Message('Z', []byte{'I'})...)
}

// TLSInjection answers an SSLRequest with 'S' immediately followed by
// inject, then serves a TLS handshake with cert. Whatever the client sends
// afterwards is recorded as a startup packet on the server (Startups).
func TLSInjection(cert tls.Certificate, inject []byte) Script {
	return func(s *Server, c net.Conn) error {
		code, _, err := ReadPacket(c)
		if err != nil {
			return err
		}
		if code != SSLRequest {
			s.record(nil)
			return fmt.Errorf("faultpg: expected SSLRequest, got code %d", code)
		}
		if _, err := c.Write(append([]byte{'S'}, inject...)); err != nil {
			return err
		}
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		if err := tc.Handshake(); err != nil {
			return nil // the client aborted: what a safe client does
		}
		_, body, err := ReadPacket(tc)
		if err != nil {
			return nil
		}
		s.record(body)
		return nil
	}
}

func (s *Server) record(body []byte) {
	s.mu.Lock()
	s.got = append(s.got, body)
	s.mu.Unlock()
}

// Startups are the startup packets (bodies) clients sent after a TLS
// handshake completed, and nil for each connection that did not start with
// an SSLRequest.
func (s *Server) Startups() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.got...)
}

// ReadMessage reads one frontend message after the startup phase (type,
// length, body) and returns its type and body.
func ReadMessage(c net.Conn) (typ byte, body []byte, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n < 4 || n > 1<<20 {
		return 0, nil, fmt.Errorf("faultpg: message %q with length %d", hdr[0], n)
	}
	body = make([]byte, n-4)
	if _, err := io.ReadFull(c, body); err != nil {
		return 0, nil, err
	}
	return hdr[0], body, nil
}

// PasswordLogin serves a login: it reads the StartupMessage, asks for a
// cleartext password and accepts any, then ends the login with
// AuthenticationOk, a few ParameterStatus, BackendKeyData (pid) and
// ReadyForQuery 'I' followed by behind, all in ONE write: a server with
// more to say right after the login (a notice, a terminate).
func PasswordLogin(c net.Conn, pid uint32, behind []byte) error {
	code, _, err := ReadPacket(c)
	if err != nil {
		return err
	}
	if code>>16 != 3 {
		return fmt.Errorf("faultpg: expected a StartupMessage, got code %d", code)
	}
	if _, err := c.Write(Message('R', []byte{0, 0, 0, 3})); err != nil {
		return err
	}
	typ, _, err := ReadMessage(c)
	if err != nil {
		return err
	}
	if typ != 'p' {
		return fmt.Errorf("faultpg: expected a PasswordMessage, got %q", typ)
	}
	b := Message('R', []byte{0, 0, 0, 0})
	for _, kv := range [][2]string{{"client_encoding", "UTF8"}, {"server_encoding", "UTF8"}, {"server_version", "17.0"}, {"standard_conforming_strings", "on"}, {"DateStyle", "ISO, MDY"}} {
		b = append(b, Message('S', []byte(kv[0]+"\x00"+kv[1]+"\x00"))...)
	}
	key := binary.BigEndian.AppendUint32(nil, pid)
	b = append(b, Message('K', key, []byte{0, 0, 0, 7})...)
	b = append(b, Message('Z', []byte{'I'})...)
	_, err = c.Write(append(b, behind...))
	return err
}
