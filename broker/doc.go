// Package broker is the Postgres side of pgward: the listener on the node
// socket, the session state machine (startup, identity, policy, credentials,
// upstream authentication, greeting, relay, cancel), and the interfaces it
// consumes: IdentityResolver (who is calling), secrets.Source (the real
// credential) and Observer (audit, metrics, logs).
//
// For operators (sessions.go): Sessions lists the live sessions with their
// state as the server's ReadyForQuery says it, EndSession ends one like a
// revoked grant (endsession.go), Parked lists the reuse pool.
//
// Lifecycle: New validates the Config; Serve(ctx, ln) accepts until ctx ends
// or Close is called; Shutdown stops accepting and drains sessions with a limit.
//
// It deliberately does not import any package of pgward's, Prometheus, the
// OpenTelemetry SDK or cilium/ebpf: the agent wires those in through the
// interfaces above. It does not pool upstream connections unless configured,
// and it never decodes and re-encodes relayed messages: it reads frame headers
// and looks at the few frontend messages audit needs.
package broker
