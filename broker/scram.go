package broker

import (
	"bytes"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"sync"

	"golang.org/x/text/secure/precis"
)

// SCRAM-SHA-256 client (RFC 5802, RFC 7677) as PostgreSQL speaks it, with
// tls-server-end-point channel binding (RFC 5929) for SCRAM-SHA-256-PLUS.
//
// The expensive step, PBKDF2 over the password with the server's salt and
// iteration count, depends on (password, salt, iterations) only, so its
// results (ClientKey, ServerKey) are cached: a repeated login pays two
// HMACs, not 4096 (the server default) or more. Each upstream owns its
// cache (upstream.scram): it lives as long as that upstream's
// configuration, so a reload or a Server's end drops the derived keys with
// it, and nothing is shared between Servers in one process.

const (
	scramMech     = "SCRAM-SHA-256"
	scramMechPlus = "SCRAM-SHA-256-PLUS"
	// scramMaxIterations refuses a server that would make us burn CPU.
	scramMaxIterations = 1 << 20
	scramCacheSize     = 4096
)

type scramKeys struct{ client, server [sha256.Size]byte }

// scramKeyCache maps an HMAC of (password, salt, iterations) under a
// per-process random key to the derived keys. The map keys reveal nothing
// of the password; the values are password-equivalent for that server, as
// sensitive as the secret pgward already holds in memory.
type scramKeyCache struct {
	mu           sync.Mutex
	key          [32]byte
	m            map[[32]byte]scramKeys
	hits, misses int64
}

func newScramKeyCache() *scramKeyCache {
	c := &scramKeyCache{m: map[[32]byte]scramKeys{}}
	_, _ = rand.Read(c.key[:])
	return c
}

func (c *scramKeyCache) id(password, salt []byte, iter int) [32]byte {
	h := hmac.New(sha256.New, c.key[:])
	var n [8]byte
	h.Write(strconv.AppendInt(n[:0], int64(len(password)), 10))
	h.Write([]byte{0})
	h.Write(password)
	h.Write(strconv.AppendInt(n[:0], int64(iter), 10))
	h.Write([]byte{0})
	h.Write(salt)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// keys returns ClientKey and ServerKey, deriving them only on a miss. A
// nil cache derives them every time.
func (c *scramKeyCache) keys(password, salt []byte, iter int) (scramKeys, error) {
	if c == nil {
		return deriveSCRAMKeys(password, salt, iter)
	}
	id := c.id(password, salt, iter)
	c.mu.Lock()
	k, ok := c.m[id]
	if ok {
		c.hits++
	}
	c.mu.Unlock()
	if ok {
		return k, nil
	}
	k, err := deriveSCRAMKeys(password, salt, iter)
	if err != nil {
		return scramKeys{}, err
	}
	c.mu.Lock()
	c.misses++
	if len(c.m) >= scramCacheSize {
		for old := range c.m { // evict one at random
			delete(c.m, old)
			break
		}
	}
	c.m[id] = k
	c.mu.Unlock()
	return k, nil
}

// deriveSCRAMKeys is the PBKDF2 step and the two keys made from its result.
func deriveSCRAMKeys(password, salt []byte, iter int) (scramKeys, error) {
	var k scramKeys
	salted, err := pbkdf2.Key(sha256.New, string(password), salt, iter, sha256.Size)
	if err != nil {
		return k, err
	}
	copy(k.client[:], hmacSHA256(salted, []byte("Client Key")))
	copy(k.server[:], hmacSHA256(salted, []byte("Server Key")))
	return k, nil
}

func hmacSHA256(key, msg []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(msg)
	return h.Sum(nil)
}

// normalizeSCRAMPassword applies SASLprep as PostgreSQL does, falling back to
// the raw bytes when the password is not valid under it.
func normalizeSCRAMPassword(p string) []byte {
	ascii := true
	for i := 0; i < len(p); i++ {
		if p[i] >= 0x80 {
			ascii = false
			break
		}
	}
	if !ascii {
		if n, err := precis.OpaqueString.String(p); err == nil {
			return []byte(n)
		}
	}
	return []byte(p)
}

// scramClient is one SCRAM exchange.
type scramClient struct {
	cache       *scramKeyCache // the upstream's; nil derives every time
	password    []byte
	gs2         []byte // GS2 header
	cbData      []byte // channel binding data (PLUS only)
	clientNonce []byte
	clientFirst []byte // client-first-message-bare
	authMessage []byte
	keys        scramKeys
	verified    bool // the server-final-message verified
}

var errSCRAM = errors.New("SCRAM exchange failed")

// newSCRAMClient starts an exchange, with the keys cached in cache. cbData is the tls-server-end-point hash
// when the PLUS mechanism is used; tlsNoBind says TLS is on but the server did
// not offer PLUS ("y" flag, so a downgrade is detectable by the server).
func newSCRAMClient(cache *scramKeyCache, password string, plus bool, cbData []byte, tlsNoBind bool) (*scramClient, error) {
	var raw [18]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, err
	}
	sc := &scramClient{cache: cache, password: normalizeSCRAMPassword(password)}
	sc.clientNonce = []byte(base64.RawStdEncoding.EncodeToString(raw[:]))
	switch {
	case plus:
		sc.gs2, sc.cbData = []byte("p=tls-server-end-point,,"), cbData
	case tlsNoBind:
		sc.gs2 = []byte("y,,")
	default:
		sc.gs2 = []byte("n,,")
	}
	sc.clientFirst = append([]byte("n=,r="), sc.clientNonce...)
	return sc, nil
}

// first is the SASLInitialResponse data.
func (sc *scramClient) first() []byte {
	return append(append([]byte(nil), sc.gs2...), sc.clientFirst...)
}

// final answers the server-first-message with the client-final-message.
func (sc *scramClient) final(serverFirst []byte) ([]byte, error) {
	var nonce, salt []byte
	iter := 0
	for _, attr := range bytes.Split(serverFirst, []byte(",")) {
		if len(attr) < 2 || attr[1] != '=' {
			continue
		}
		v := attr[2:]
		switch attr[0] {
		case 'r':
			nonce = v
		case 's':
			s, err := base64.StdEncoding.DecodeString(string(v))
			if err != nil {
				return nil, fmt.Errorf("%w: bad salt", errSCRAM)
			}
			salt = s
		case 'i':
			n, err := strconv.Atoi(string(v))
			if err != nil {
				return nil, fmt.Errorf("%w: bad iteration count", errSCRAM)
			}
			iter = n
		case 'm':
			return nil, fmt.Errorf("%w: server requires an unsupported extension", errSCRAM)
		}
	}
	if !bytes.HasPrefix(nonce, sc.clientNonce) || len(nonce) == len(sc.clientNonce) {
		return nil, fmt.Errorf("%w: server nonce does not extend ours", errSCRAM)
	}
	if len(salt) == 0 || iter < 1 || iter > scramMaxIterations {
		return nil, fmt.Errorf("%w: salt or iteration count out of range (%d)", errSCRAM, iter)
	}
	keys, err := sc.cache.keys(sc.password, salt, iter)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errSCRAM, err)
	}
	sc.keys = keys
	cbind := base64.StdEncoding.EncodeToString(append(append([]byte(nil), sc.gs2...), sc.cbData...))
	withoutProof := append([]byte("c="+cbind+",r="), nonce...)
	sc.authMessage = bytes.Join([][]byte{sc.clientFirst, serverFirst, withoutProof}, []byte(","))
	stored := sha256.Sum256(keys.client[:])
	sig := hmacSHA256(stored[:], sc.authMessage)
	proof := make([]byte, len(sig))
	for i := range sig {
		proof[i] = keys.client[i] ^ sig[i]
	}
	return append(withoutProof, ",p="+base64.StdEncoding.EncodeToString(proof)...), nil
}

// verify checks the server-final-message: the server proves it knew the
// password's verifier too.
func (sc *scramClient) verify(serverFinal []byte) error {
	if bytes.HasPrefix(serverFinal, []byte("e=")) {
		return fmt.Errorf("%w: server error %q", errSCRAM, serverFinal[2:])
	}
	if !bytes.HasPrefix(serverFinal, []byte("v=")) {
		return fmt.Errorf("%w: malformed server-final-message", errSCRAM)
	}
	got, err := base64.StdEncoding.DecodeString(string(serverFinal[2:]))
	if err != nil {
		return fmt.Errorf("%w: malformed server signature", errSCRAM)
	}
	want := hmacSHA256(sc.keys.server[:], sc.authMessage)
	if !hmac.Equal(got, want) {
		return fmt.Errorf("%w: server signature does not verify", errSCRAM)
	}
	return nil
}

// tlsServerEndPoint is the tls-server-end-point channel binding data: the
// hash of the server's certificate, SHA-256 for MD5/SHA-1 signatures.
func tlsServerEndPoint(cert *x509.Certificate) ([]byte, error) {
	var h hash.Hash
	switch cert.SignatureAlgorithm {
	case x509.MD5WithRSA, x509.SHA1WithRSA, x509.ECDSAWithSHA1,
		x509.SHA256WithRSA, x509.SHA256WithRSAPSS, x509.ECDSAWithSHA256:
		h = sha256.New()
	case x509.SHA384WithRSA, x509.SHA384WithRSAPSS, x509.ECDSAWithSHA384:
		h = sha512.New384()
	case x509.SHA512WithRSA, x509.SHA512WithRSAPSS, x509.ECDSAWithSHA512:
		h = sha512.New()
	default:
		return nil, fmt.Errorf("tls-server-end-point is undefined for signature algorithm %v", cert.SignatureAlgorithm)
	}
	h.Write(cert.Raw)
	return h.Sum(nil), nil
}
