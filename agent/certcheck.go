package agent

import (
	"slices"

	"github.com/pgward/pgward/broker"
)

// checkCertSources reports each upstream whose auth lists cert but whose
// secrets backend cannot give a client certificate: env holds passwords
// only, and vault needs a pki mapping for at least one of the upstream's
// roles. (The file backend's entries are checked when the file is read.)
func (c *Config) checkCertSources(fe func(path, format string, args ...any)) {
	def := c.Secrets.Backend
	if def == "" {
		def = "file"
	}
	for _, name := range sortedNames(c.Upstreams) {
		u := c.Upstreams[name]
		if !slices.Contains(u.Auth, broker.AuthCert) {
			continue
		}
		b := u.Secrets
		if b == "" {
			b = def
		}
		switch b {
		case "env":
			fe("upstreams."+name+".auth", "cert needs a client certificate from the secrets backend, and env holds only passwords: use file (cert and key) or vault (pki)")
		case "vault":
			if c.Secrets.Vault == nil {
				continue // reported as secrets.vault
			}
			has := false
			for _, rc := range c.Secrets.Vault.Roles[name] {
				has = has || rc.PKI != nil
			}
			if !has {
				fe("upstreams."+name+".auth", "cert needs a client certificate, and secrets.vault.roles.%s maps no role to pki", name)
			}
		}
	}
}
