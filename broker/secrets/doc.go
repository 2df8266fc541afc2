// Package secrets defines where the broker gets the real database credentials
// from: the Source interface, the redacting Secret type, and the file and env
// backends. Vault lives in secrets/vault.
//
// A Source is asked only after the caller's identity was verified and the
// requested (upstream, role) was authorized by policy. It never sees the
// client's bytes. Secrets are redacted at the type, so a log line, span, error
// or audit event cannot print one by accident.
package secrets
