// Package vaultsim is a small, in-process stand-in for HashiCorp Vault that
// serves the parts of Vault's HTTP API pgward uses, with the response bodies
// and error shapes of Vault's API documentation, so that pgward's Vault
// backend can be tested where Vault itself cannot be installed.
//
// It serves:
//
//   - KV version 2 reads (and writes) at GET/PUT /v1/<mount>/data/<path>,
//     with ?version=N;
//   - dynamic database credentials at GET /v1/<mount>/creds/<role>: the
//     login role is REALLY created in a Postgres reached through
//     Options.Exec, from a creation-statements template with Vault's
//     {{name}}, {{username}}, {{password}} and {{expiration}}, renewed with
//     ALTER ROLE … VALID UNTIL and dropped (after terminating its backends)
//     when the lease is revoked or expires;
//   - the lease API: PUT /v1/sys/leases/renew, /revoke and /lookup;
//   - logins: POST /v1/auth/<mount>/login for AppRole ({role_id, secret_id})
//     and Kubernetes ({role, jwt}) mounts, and the token self-service
//     endpoints /v1/auth/token/renew-self and /v1/auth/token/lookup-self;
//   - /v1/sys/health and /v1/sys/seal-status.
//
// Every other request needs a valid X-Vault-Token header and is otherwise
// answered 403 {"errors":["permission denied"]}, as Vault does.
//
// The simulator misbehaves on demand: Seal makes every request answer
// 503 {"errors":["Vault is sealed"]}; Inject adds a Fault (any status and
// error list, a delay, for requests under a path prefix, a number of times);
// RevokeLease and SetLeaseTTL revoke a lease or shorten its remaining TTL
// from the server side; Close stops the listener (connection refused).
// Requests are recorded, so tests can count creds requests or renewals.
//
// What it deliberately does not do: ACL policies (use Inject for 403), token
// creation, response wrapping, namespaces, KV v1, any engine other than KV v2
// and the Postgres database engine, persistence. It is for tests only.
package vaultsim
