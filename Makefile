# pgward: make build | test | demo | bench | lint | fuzz | generate
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
# Fuzz targets run briefly in `make test`, longer in `make fuzz`. In
# `make test` each gets a count of executions (about 8 s of this project's
# 2-core CI machine), not a time budget: with go1.26 a -fuzztime duration
# can end in a spurious "context deadline exceeded" failure when it expires
# while a worker is mid-call (golang/go#75804, fixed in go1.27). FUZZTIME, when
# set (make fuzz sets 5m), overrides the counts for every target.
FUZZTIME ?=
FUZZ_TARGETS := \
	./broker:FuzzStartupPacket:150000x \
	./broker:FuzzFrontendStream:150000x \
	./broker:FuzzBackendStream:120000x \
	./broker:FuzzParseOptions:100000x \
	./broker:FuzzRelayNoSmuggling:120000x \
	./broker:FuzzSQLEffects:100000x \
	./broker:FuzzRoleChange:100000x \
	./agent:FuzzCgroupPath:5000x \
	./agent:FuzzParseConfig:2000x \
	./agent:FuzzStatStartTime:2000x \
	./agent:FuzzUnixDiagParse:10000x \
	./bpf:FuzzDecodeEvent:100000x \
	./exporter:FuzzJSONString:30000x \
	./exporter:FuzzDecodeParam:15000x \
	./exporter:FuzzRedactSQL:20000x \
	./exporter:FuzzRedactPasswordLiteral:30000x \
	./exporter:FuzzAuditRead:40000x \
	./exporter:FuzzReadShipped:45000x \
	./exporter:FuzzShipRecord:100000x

.PHONY: all build otelcol test unit fuzz-short fuzz soak demo bench lint lint-report generate deps clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/pgward ./cmd/pgward

deps:
	bash .ci/install.sh

# A real OpenTelemetry Collector for the audit-shipping tests (OTLP receiver
# and file exporter; testenv.StartCollector runs it). Its own Go module, so
# pgward's go.mod stays lean and `go test ./...` does not descend into it.
# Built from the Go module proxy: about 3 minutes cold on 2 cores, then only
# when its sources change.
OTELCOL_SRC := testenv/otelcol/go.mod testenv/otelcol/go.sum testenv/otelcol/main.go
otelcol: bin/otelcol
bin/otelcol: $(OTELCOL_SRC)
	@mkdir -p bin
	cd testenv/otelcol && $(GO) build -o ../../bin/otelcol.tmp . && mv ../../bin/otelcol.tmp ../../bin/otelcol

# The whole suite, with the race detector, against real Postgres. As root
# (CI) nothing is skipped. Every step goes through .ci/testreport: a line per
# package with its time and counts, what is still running every 30 s, the
# output of each failure, each skip with its reason, and at the end a summary
# whose last line is "N passed, N failed, N skipped". It fails the run when
# anything failed and, under CI=true, when anything was skipped. A failed
# step does not stop the others, so the summary says everything at once.
SHELL       := /bin/bash
REPORT_STATE = bin/test-report.json
REPORT      := bin/testreport -state $(REPORT_STATE)
test: deps otelcol
	@mkdir -p bin && rm -f $(REPORT_STATE) && $(GO) build -o bin/testreport ./.ci/testreport
	@rc=0; \
	$(MAKE) --no-print-directory lint-report || rc=1; \
	$(MAKE) --no-print-directory unit || rc=1; \
	$(MAKE) --no-print-directory fuzz-short || rc=1; \
	$(REPORT) -summary || rc=1; exit $$rc

lint-report:
	@$(REPORT) -step lint -- $(MAKE) --no-print-directory lint

unit: otelcol
	@test -x bin/testreport || $(GO) build -o bin/testreport ./.ci/testreport
	@rc=0; \
	: "TestHostileMemoryBounded and TestHostileSoak assert pgward's RSS, meaningless under"; \
	: "-race: they run in the idle-scale step below instead of skipping here (under CI=true a skip fails)."; \
	$(REPORT) -step race -- $(GO) test -json -race -count=1 -timeout 15m -skip '^(TestHostileMemoryBounded|TestHostileSoak)$$' ./... || rc=1; \
	: "The load test once more, for 60 s without -race, where RSS back to"; \
	: "baseline can be asserted (make soak: 500 sessions for 5 minutes)."; \
	: "The broker's suite once more with every session on the event loop (listen.event_loop),"; \
	: "and the hostile-memory bounds with it (without -race: they assert RSS)."; \
	PGWARD_TEST_EVENT_LOOP=1 $(REPORT) -step event-loop -- $(GO) test -json -race -count=1 -timeout 10m ./broker/ || rc=1; \
	PGWARD_TEST_EVENT_LOOP=1 $(REPORT) -step event-loop-hostile -- $(GO) test -json -count=1 -timeout 10m -v -run '^(TestHostileMemoryBounded|TestLargeMessagesThroughBoundedAgent)$$' ./cmd/pgward/ || rc=1; \
	PGWARD_SOAK_DURATION=60s $(REPORT) -step load -- $(GO) test -json -count=1 -timeout 5m -run '^TestLoadMixedTraffic$$' ./agent/ || rc=1; \
	: "The idle-session scale test once more without -race: 10,000 sessions"; \
	: "(as many as RLIMIT_NOFILE allows) and RSS per session asserted; the"; \
	: "hostile-memory tests and the hostile soak's short form (issue 13), which skip under -race."; \
	$(REPORT) -step idle-scale -- $(GO) test -json -count=1 -timeout 10m -v -run '^(TestIdleSessionsScale|TestHostileMemoryBounded|TestLargeMessagesThroughBoundedAgent|TestHostileSoak)$$' ./cmd/pgward/ || rc=1; \
	exit $$rc

fuzz-short:
	@test -x bin/testreport || $(GO) build -o bin/testreport ./.ci/testreport
	@rc=0; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; rest=$${t#*:}; name=$${rest%%:*}; ft=$${rest#*:}; \
		if [ -n "$(FUZZTIME)" ]; then ft=$(FUZZTIME); fi; \
		$(REPORT) -step "fuzz $$pkg $$name $$ft" -- $(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $$ft $$pkg || rc=1; \
	done; exit $$rc

fuzz:
	$(MAKE) fuzz-short FUZZTIME=5m
	@# The differential audit test at length: thousands of random protocol
	@# programs against the server's own statement log (make test runs 12).
	PGWARD_DIFF_SESSIONS=3000 $(GO) test -count=1 -timeout 60m -run '^TestAuditMatchesServer$$' ./agent/

# 500 concurrent sessions of mixed simple/extended/COPY traffic for 5
# minutes (`make test` runs the same test with 100 sessions for 20s), then
# TestHostileSoak (cmd/pgward, pgward as its own process): 500 sessions for
# 5 minutes alone and 5 minutes beside the hostile mix of issue 13 (huge
# messages, slow readers of big results, refused logins, forged cancels,
# idle sockets of another uid); its REPORT lines give each figure and bound.
SOAK_SESSIONS ?= 500
SOAK_DURATION ?= 5m
soak: deps
	PGWARD_SOAK_SESSIONS=$(SOAK_SESSIONS) PGWARD_SOAK_DURATION=$(SOAK_DURATION) \
		$(GO) test -count=1 -timeout 30m -v -run '^TestLoadMixedTraffic$$' ./agent/
	PGWARD_SOAK_SESSIONS=$(SOAK_SESSIONS) PGWARD_SOAK_DURATION=$(SOAK_DURATION) \
		$(GO) test -count=1 -timeout 30m -v -run '^TestHostileSoak$$' ./cmd/pgward/

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# A private Postgres and an agent with an example policy; prints the psql line.
# Each session's trace is printed as JSON lines (OTEL_TRACES_EXPORTER=console)
# unless an OTLP endpoint or another exporter is set.
demo: build
	@if [ -z "$$OTEL_TRACES_EXPORTER$$OTEL_EXPORTER_OTLP_ENDPOINT$$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" ]; then \
		export OTEL_TRACES_EXPORTER=console; fi; ./bin/pgward demo

# pgbench through pgward and directly, side by side.
# make bench BENCH_FLAGS="-duration 5s -rounds 3 -workloads simple,connect"
# make bench BASELINE=<git rev>: that commit's pgward (built from git archive
# in a temporary directory) runs as the pgw-base row in the same rounds as
# bin/pgward, and the bench prints this build's ratios to it.
BASELINE ?=
bench: deps build
	@set -e; flags='$(BENCH_FLAGS)'; \
	if [ -n '$(BASELINE)' ]; then \
		tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/pgward-baseline-XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
		echo "building the baseline $(BASELINE) in $$tmp"; \
		git archive --format=tar '$(BASELINE)' | tar -x -C "$$tmp"; \
		(cd "$$tmp" && $(GO) build -ldflags "-X main.version=$(BASELINE)" -o pgward ./cmd/pgward); \
		flags="$$flags -pgward $(CURDIR)/bin/pgward -baseline $$tmp/pgward"; \
	fi; \
	$(GO) run ./cmd/pgward-bench $$flags

# Rebuild the eBPF objects (committed, so `go build` needs no clang).
generate:
	@command -v clang >/dev/null && command -v llvm-strip >/dev/null && test -f /usr/include/bpf/bpf_helpers.h || \
		(apt-get update -qq && apt-get install -y -qq clang llvm libbpf-dev)
	$(GO) generate ./bpf/

clean:
	rm -rf bin
