package exporter

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
)

// Defaults of CheckpointConfig.
const (
	DefaultCheckpointEveryLines = 1000
	DefaultCheckpointEvery      = 10 * time.Second
)

// CheckpointConfig is `audit.checkpoint`: keyed checkpoints over the chain.
// With no Key, checkpoints are off and the audit is unkeyed (the agent says
// so at WARN when it starts).
type CheckpointConfig struct {
	// EveryLines: a checkpoint after at most this many lines (default 1000).
	EveryLines int `yaml:"every_lines"`
	// Every: a checkpoint at most this long after a line was written
	// (default 10s). Whichever of EveryLines and Every comes first wins;
	// checkpoints are also written before a rotation and at shutdown.
	Every time.Duration `yaml:"every"`
	// Key names the ed25519 signing key in a secrets backend. Unset: no
	// checkpoints.
	Key *CheckpointKeyRef `yaml:"key"`
}

// CheckpointKeyRef names the signing key as a credential of a secrets
// backend: the "password" of Role on Upstream (file: upstream → role →
// {password}; env: PGWARD_SECRET_<UPSTREAM>_<ROLE>; vault:
// secrets.vault.roles.<upstream>.<role>.kv). Upstream must not be the name
// of a configured upstream, so that no client can ever be granted it.
type CheckpointKeyRef struct {
	// Backend is file, env or vault; default: secrets.backend.
	Backend  string `yaml:"backend"`
	Upstream string `yaml:"upstream"`
	Role     string `yaml:"role"`
}

func (c CheckpointConfig) withDefaults() CheckpointConfig {
	if c.EveryLines == 0 {
		c.EveryLines = DefaultCheckpointEveryLines
	}
	if c.Every == 0 {
		c.Every = DefaultCheckpointEvery
	}
	return c
}

// fieldError is a configuration problem at a key path; the agent adds the
// file and line.
func fieldError(path, format string, args ...any) error {
	return &broker.FieldError{Path: path, Err: fmt.Errorf(format, args...)}
}

func (c CheckpointConfig) validate() []error {
	var errs []error
	if c.EveryLines < 0 {
		errs = append(errs, fieldError("audit.checkpoint.every_lines", "%d must not be negative", c.EveryLines))
	}
	if c.Every < 0 {
		errs = append(errs, fieldError("audit.checkpoint.every", "%s must not be negative", c.Every))
	} else if c.Every > 0 && c.Every < 100*time.Millisecond {
		errs = append(errs, fieldError("audit.checkpoint.every", "%s is below the minimum of 100ms", c.Every))
	}
	if k := c.Key; k != nil {
		if err := broker.CheckChoice("audit.checkpoint.key.backend", k.Backend, secrets.Backends); k.Backend != "" && err != nil {
			errs = append(errs, err)
		}
		if k.Upstream == "" {
			errs = append(errs, fieldError("audit.checkpoint.key.upstream", "required"))
		}
		if k.Role == "" {
			errs = append(errs, fieldError("audit.checkpoint.key.role", "required"))
		}
	}
	return errs
}

// CheckpointKey is the node's ed25519 signing key. It never prints: String,
// GoString, Format, LogValue, MarshalJSON and MarshalText all redact it.
type CheckpointKey struct{ k ed25519.PrivateKey }

const redactedKey = "[REDACTED ed25519 key]"

func (CheckpointKey) String() string                { return redactedKey }
func (CheckpointKey) GoString() string              { return redactedKey }
func (CheckpointKey) LogValue() slog.Value          { return slog.StringValue(redactedKey) }
func (CheckpointKey) MarshalJSON() ([]byte, error)  { return []byte(`"` + redactedKey + `"`), nil }
func (CheckpointKey) MarshalText() ([]byte, error)  { return []byte(redactedKey), nil }
func (CheckpointKey) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redactedKey)) }
func (k CheckpointKey) valid() bool                 { return len(k.k) == ed25519.PrivateKeySize }
func (k CheckpointKey) public() ed25519.PublicKey   { return k.k.Public().(ed25519.PublicKey) }
func (k CheckpointKey) sign(msg []byte) []byte      { return ed25519.Sign(k.k, msg) }
func (k CheckpointKey) KeyID() string               { return KeyID(k.public()) }

// KeyID names a public key in checkpoints and reports: the first 8 bytes
// of its SHA-256, in hex. It is not secret.
func KeyID(pub ed25519.PublicKey) string {
	s := sha256.Sum256(pub)
	return hex.EncodeToString(s[:8])
}

// ParseCheckpointKey reads a signing key as stored in the secrets backend:
// a PKCS#8 PEM block ("PRIVATE KEY", what `pgward audit keygen` and
// `openssl genpkey -algorithm ed25519` write) or the standard base64 of the
// 32-byte seed. The error never quotes the value.
func ParseCheckpointKey(s string) (CheckpointKey, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "-----BEGIN") {
		b, _ := pem.Decode([]byte(s))
		if b == nil || b.Type != "PRIVATE KEY" {
			return CheckpointKey{}, errors.New("checkpoint key: not a PEM \"PRIVATE KEY\" block")
		}
		k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
		if err != nil {
			return CheckpointKey{}, errors.New("checkpoint key: the PEM block is not a PKCS#8 private key")
		}
		ek, ok := k.(ed25519.PrivateKey)
		if !ok {
			return CheckpointKey{}, fmt.Errorf("checkpoint key: a %T, want ed25519", k)
		}
		return CheckpointKey{k: ek}, nil
	}
	seed, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(seed) != ed25519.SeedSize {
		return CheckpointKey{}, errors.New("checkpoint key: neither a PKCS#8 PEM block nor the base64 of a 32-byte ed25519 seed")
	}
	return CheckpointKey{k: ed25519.NewKeyFromSeed(seed)}, nil
}

// ParseCheckpointPublicKey reads a verifying key: a PEM "PUBLIC KEY"
// (PKIX, as `pgward audit keygen` and `openssl pkey -pubout` write) or the
// standard base64 of the 32-byte key.
func ParseCheckpointPublicKey(data []byte) (ed25519.PublicKey, error) {
	s := strings.TrimSpace(string(data))
	if strings.HasPrefix(s, "-----BEGIN") {
		b, _ := pem.Decode([]byte(s))
		if b == nil || b.Type != "PUBLIC KEY" {
			return nil, errors.New("not a PEM \"PUBLIC KEY\" block (is it the private key?)")
		}
		k, err := x509.ParsePKIXPublicKey(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("public key: %w", err)
		}
		ek, ok := k.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("public key: a %T, want ed25519", k)
		}
		return ek, nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != ed25519.PublicKeySize {
		return nil, errors.New("neither a PEM \"PUBLIC KEY\" block nor the base64 of a 32-byte ed25519 public key")
	}
	return ed25519.PublicKey(b), nil
}

// GenerateCheckpointKey makes a new key pair: the private key as PKCS#8 PEM
// (for the secrets backend) and the public key as PKIX PEM (for verify).
func GenerateCheckpointKey() (private, public []byte, err error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	p8, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	pk, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pk}), nil
}

// Checkpoint is what a checkpoint signs, and what the log stream carries
// outside the audit file (as its Anchor). The checkpoint line itself has
// seq HeadSeq+1 and prev_hash HeadHash.
type Checkpoint struct {
	Node     string    // the node (host name) whose audit it is
	HeadSeq  int64     // seq of the last line covered (0: the previous file's last line)
	HeadHash string    // hex SHA-256 of that line
	Time     time.Time // when the checkpoint was made
	KeyID    string    // KeyID of the signing key
	Sig      []byte    // ed25519 signature of Message()
}

// Message is the byte string signed: a version tag, then node, head seq,
// head hash and time (Unix nanoseconds), separated by NUL.
func (c *Checkpoint) Message() []byte {
	b := []byte("pgward audit checkpoint v1\x00")
	b = append(b, c.Node...)
	b = append(b, 0)
	b = strconv.AppendInt(b, c.HeadSeq, 10)
	b = append(b, 0)
	b = append(b, c.HeadHash...)
	b = append(b, 0)
	return strconv.AppendInt(b, c.Time.UnixNano(), 10)
}

// VerifySignature reports whether Sig is pub's signature of Message.
func (c *Checkpoint) VerifySignature(pub ed25519.PublicKey) bool {
	return len(c.Sig) == ed25519.SignatureSize && ed25519.Verify(pub, c.Message(), c.Sig)
}

// Anchor is the checkpoint as one token, printed in the log line and
// accepted by `pgward audit verify --checkpoint`:
// cp1.<head seq>.<head hash>.<unix nanos>.<base64url signature>.<base64url node>.
func (c *Checkpoint) Anchor() string {
	return "cp1." + strconv.FormatInt(c.HeadSeq, 10) + "." + c.HeadHash + "." +
		strconv.FormatInt(c.Time.UnixNano(), 10) + "." +
		base64.RawURLEncoding.EncodeToString(c.Sig) + "." +
		base64.RawURLEncoding.EncodeToString([]byte(c.Node))
}

// ParseAnchor reads a token made by Anchor.
func ParseAnchor(s string) (Checkpoint, error) {
	p := strings.Split(strings.TrimSpace(s), ".")
	bad := func(what string) (Checkpoint, error) {
		return Checkpoint{}, fmt.Errorf("checkpoint anchor: %s (want cp1.SEQ.HASH.NANOS.SIG.NODE as printed in the \"audit checkpoint\" log line)", what)
	}
	if len(p) != 6 || p[0] != "cp1" {
		return bad("not six dot-separated parts starting with cp1")
	}
	var c Checkpoint
	var err error
	if c.HeadSeq, err = strconv.ParseInt(p[1], 10, 64); err != nil || c.HeadSeq < 0 {
		return bad("bad seq")
	}
	if h, err := hex.DecodeString(p[2]); err != nil || len(h) != sha256.Size {
		return bad("bad hash")
	}
	c.HeadHash = p[2]
	ns, err := strconv.ParseInt(p[3], 10, 64)
	if err != nil {
		return bad("bad time")
	}
	c.Time = time.Unix(0, ns).UTC()
	if c.Sig, err = base64.RawURLEncoding.DecodeString(p[4]); err != nil || len(c.Sig) != ed25519.SignatureSize {
		return bad("bad signature")
	}
	node, err := base64.RawURLEncoding.DecodeString(p[5])
	if err != nil {
		return bad("bad node")
	}
	c.Node = string(node)
	return c, nil
}

// checkpointBody builds the event object (without its closing brace; the
// sink appends seq and prev_hash) signing the head (seq, prev).
func checkpointBody(buf []byte, now time.Time, key CheckpointKey, node string, seq int64, prev [sha256.Size]byte, reason string) ([]byte, Checkpoint) {
	now = now.UTC()
	cp := Checkpoint{Node: node, HeadSeq: seq, HeadHash: hex.EncodeToString(prev[:]), Time: now, KeyID: key.KeyID()}
	cp.Sig = key.sign(cp.Message())
	buf = headerStart(buf, now, EventCheckpoint, CodeCheckpoint)
	buf = appendStringField(buf, "node", node)
	buf = appendStringField(buf, "reason", reason)
	buf = appendIntField(buf, "head_seq", seq)
	buf = appendStringField(buf, "head_hash", cp.HeadHash)
	buf = appendStringField(buf, "key_id", cp.KeyID)
	buf = appendStringField(buf, "signature", base64.StdEncoding.EncodeToString(cp.Sig))
	return buf, cp
}

// checkpointLine is the part of a checkpoint line the verifier reads.
type checkpointLine struct {
	Event     string `json:"event"`
	Time      string `json:"time"`
	Node      string `json:"node"`
	HeadSeq   *int64 `json:"head_seq"`
	HeadHash  string `json:"head_hash"`
	KeyID     string `json:"key_id"`
	Signature string `json:"signature"`
}

// parseCheckpointLine reads a line known to be an audit.checkpoint event.
func parseCheckpointLine(line []byte) (Checkpoint, error) {
	var v checkpointLine
	if err := json.Unmarshal(line, &v); err != nil {
		return Checkpoint{}, err
	}
	if v.HeadSeq == nil || v.HeadHash == "" || v.Signature == "" || v.Time == "" {
		return Checkpoint{}, errors.New("checkpoint without head_seq, head_hash, time or signature")
	}
	t, err := time.Parse(time.RFC3339Nano, v.Time)
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint time: %w", err)
	}
	sig, err := base64.StdEncoding.DecodeString(v.Signature)
	if err != nil {
		return Checkpoint{}, errors.New("checkpoint signature is not base64")
	}
	return Checkpoint{Node: v.Node, HeadSeq: *v.HeadSeq, HeadHash: v.HeadHash, Time: t, KeyID: v.KeyID, Sig: sig}, nil
}

// The sink's side of checkpoints. Every function ending in Locked runs with
// a.mu held.

func (a *FileSink) dueLocked() bool {
	return a.cpOn && a.cpSince >= a.cfg.Checkpoint.EveryLines
}

// stageCheckpointIfDueLocked stages a checkpoint right after the lines the
// caller just staged once every_lines is reached; the caller waits for it
// with its own lines (one write, one fsync) and then calls
// checkpointDoneLocked.
func (a *FileSink) stageCheckpointIfDueLocked() *Checkpoint {
	if !a.dueLocked() {
		return nil
	}
	b := a.getBuf()
	body, cp := checkpointBody(*b, time.Now(), a.cpKey, a.cpNode, a.seq, a.prev, "lines")
	*b = body
	a.stageLocked(b)
	a.pendDur++
	a.cpSince = 0
	a.putBuf(b)
	return &cp
}

// checkpointDoneLocked logs a staged checkpoint once written; if its write
// failed, the next line makes a new one.
func (a *FileSink) checkpointDoneLocked(cp *Checkpoint, err error) {
	if cp == nil {
		return
	}
	if err != nil {
		a.cpSince = max(a.cpSince, a.cfg.Checkpoint.EveryLines)
		return
	}
	a.checkpointWritten(cp, "lines")
}

// checkpointIfDueLocked writes a checkpoint now if every_lines is reached
// (the rare write paths and async mode, where nothing is staged). No write
// may be in flight.
func (a *FileSink) checkpointIfDueLocked() {
	if !a.dueLocked() || a.prepareLocked() != nil {
		return
	}
	if err := a.appendCheckpointLocked("lines"); err != nil {
		_ = a.writeFailed(err)
	}
}

// appendCheckpointLocked writes the waiting result lines and then a
// checkpoint over the head, at the end of the current file (never rotating:
// a file may exceed max_size by one checkpoint line). prepareLocked
// succeeded and no write is in flight.
func (a *FileSink) appendCheckpointLocked(reason string) error {
	if a.pendN > 0 {
		n, err := a.f.Write(a.pend)
		if err != nil {
			a.failPendLocked(n)
			return err
		}
		a.pend, a.pendN = a.pend[:0], 0
	}
	b := a.getBuf()
	defer a.putBuf(b)
	body, cp := checkpointBody(*b, time.Now(), a.cpKey, a.cpNode, a.seq, a.prev, reason)
	*b = body
	if err := a.appendLine(b); err != nil {
		a.cpSince = max(a.cpSince, 1)
		return err
	}
	a.cpSince = 0
	a.checkpointWritten(&cp, reason)
	return nil
}

// checkpointNow writes a checkpoint if any line was written since the last
// one (the every timer).
func (a *FileSink) checkpointNow(reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.cpSince == 0 {
		return
	}
	a.drainLocked()
	if a.closed || a.cpSince == 0 {
		return
	}
	if err := a.prepareLocked(); err != nil {
		_ = a.writeFailed(err)
		return
	}
	if err := a.appendCheckpointLocked(reason); err != nil {
		_ = a.writeFailed(err)
		return
	}
	a.writeOK()
}

func (a *FileSink) checkpointLoop() {
	defer close(a.cpDone)
	t := time.NewTicker(a.cfg.Checkpoint.Every)
	defer t.Stop()
	for {
		select {
		case <-a.cpStop:
			return
		case <-t.C:
			a.checkpointNow("interval")
		}
	}
}

// checkpointWritten counts a checkpoint that is in the file and copies it to
// the log stream: one INFO line, with the anchor `pgward audit verify
// --checkpoint` and `--log` take. Never the key.
func (a *FileSink) checkpointWritten(cp *Checkpoint, reason string) {
	a.m.AuditEvents(kindCheckpoint, 1)
	a.log.Info("audit checkpoint",
		"path", a.cfg.Path,
		"node", cp.Node,
		"reason", reason,
		"seq", cp.HeadSeq+1,
		"head_seq", cp.HeadSeq,
		"head_hash", cp.HeadHash,
		"key_id", cp.KeyID,
		"signature", base64.StdEncoding.EncodeToString(cp.Sig),
		"anchor", cp.Anchor())
}
