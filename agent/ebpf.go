package agent

import (
	"context"
	"net"
)

// ebpfState is the running eBPF tracker, if any.
type ebpfState struct {
	tracker any
}

func (a *Agent) startEBPF(ctx context.Context) error { return nil }

func (e *ebpfState) watchTCP(net.Addr)       {}
func (e *ebpfState) run(ctx context.Context) {}
