// Package testenv starts real servers for pgward's tests and for
// `pgward demo`: a private PostgreSQL with fixed roles, TLS and a Unix
// socket; throwaway certificate authorities; and helpers that run commands
// as other uids and skip tests that need privileges they lack.
package testenv
