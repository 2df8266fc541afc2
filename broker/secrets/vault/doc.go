// Package vault is the HashiCorp Vault secrets backend: a secrets.Source
// that reads static passwords from a KV version 2 engine and issues dynamic
// logins from the database secrets engine, through Vault's official Go
// client.
//
// Lifecycle: New validates the Config, builds the client (from the Config
// alone; VAULT_* environment variables are ignored) and logs in with a token
// file, AppRole or Kubernetes auth. A goroutine keeps pgward's token alive,
// renewing it at two thirds of its TTL and logging in again when it can no
// longer be renewed; a 403 from Vault also triggers one fresh login. Fetch
// serves the (upstream, role) mapping of Config.Roles:
//
//   - kv: the secret's field (default "password"), optionally at a pinned
//     version, cached for cache_ttl;
//   - database: a lease from <mount>/creds/<role>, shared by every session
//     that fetches it while it is current and refcounted through
//     Lease.Release. A watcher renews the lease at two thirds of its TTL,
//     looks it up every lease_check_interval to notice a revocation or a
//     TTL shortened in Vault, and closes Lease.Done with reason
//     "lease_expired" or "lease_revoked" when it ends, so the broker ends the
//     sessions that use it. When the last session releases a lease, pgward
//     keeps it for lease_linger (for the next session to reuse) and then
//     revokes it.
//
// At most one Vault request per (upstream, role) is in flight: concurrent
// fetches share it. Every request is bounded by timeout. Close revokes every
// lease pgward holds and stops the goroutines.
//
// Errors are *Error values that wrap secrets.ErrUnavailable (Vault down,
// sealed, timing out, 5xx), secrets.ErrDenied (403, refused login) or
// secrets.ErrNotFound (404, unknown role, missing field). Their messages name
// the operation, the Vault path and what Vault said; never a password or a
// token, and the log lines this package writes hold none either.
//
// It deliberately does not: read the VAULT_* environment, use Vault Agent's
// cache or response wrapping, support KV version 1, namespaces, or the
// database engine's static roles, or write anything to Vault other than
// lease renewals and revocations.
package vault
