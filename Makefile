# Strait. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
TOOLS := $(CURDIR)/.tools/bin
STATICCHECK_VERSION := v0.8.2
BUF_VERSION := v1.75.0
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
FUZZTIME ?= 30s
# Minimizing a new interesting input may otherwise stall a run for a minute.
FUZZMINIMIZE ?= 5s
PKGS := ./...

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The sidecar is built lean: static, without symbol tables, and without
# grpc's x/net/trace (which pulls in html/template). Its resident memory
# follows its size.
PROXY_BUILD := CGO_ENABLED=0 $(GO) build -tags grpcnotrace -trimpath -ldflags '-s -w'

.PHONY: build
build: ## Build the binaries into bin/ (strait, strait-proxy)
	$(GO) build -o bin/ ./cmd/strait
	$(PROXY_BUILD) -o bin/ ./cmd/strait-proxy

.PHONY: demo
demo: build ## Run the main job: the Strait story on this machine (no Docker, no Kubernetes)
	./bin/strait demo

.PHONY: test
test: ## Run all tests with the race detector (what CI runs)
	$(GO) test -race -count=1 $(PKGS)

.PHONY: race
race: ## Run all tests with the race detector, twice, shuffled
	$(GO) test -race -count=2 -shuffle=on $(PKGS)

.PHONY: lint
lint: $(TOOLS)/staticcheck ## gofmt, go vet, staticcheck, go mod tidy check
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(TOOLS)/staticcheck $(PKGS)
	$(GO) mod tidy -diff

# Tools are pinned by version and installed into .tools/bin on first use;
# `go install pkg@version` resolves each from its own go.mod, so their
# dependencies never enter Strait's.
$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
$(TOOLS)/buf:
	GOBIN=$(TOOLS) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

GEN_TOOLS := $(TOOLS)/buf $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc
GENERATED := controlplane/api federation/api

.PHONY: generate
generate: $(GEN_TOOLS) ## Regenerate protobuf/gRPC code (buf) and go:generate output
	$(TOOLS)/buf lint
	$(TOOLS)/buf generate
	$(GO) generate $(PKGS)

.PHONY: generate-check
generate-check: generate ## Fail if checked-in generated code is not current
	@if ! git diff --quiet -- $(GENERATED) || [ -n "$$(git ls-files --others --exclude-standard -- $(GENERATED))" ]; then \
	  git status --short -- $(GENERATED); echo "generated code is stale: run make generate and commit"; exit 1; fi

.PHONY: bench
bench: ## Benchmarks, reported as ratios against a baseline measured in the same run; failover and rotation times as measured
	STRAIT_BENCH=1 $(GO) test -p 1 -count=1 -run '^TestReport' -v ./ca/ ./e2e/ ./cmd/strait/ | grep -E 'report:|^(ok|FAIL|---)|_test\.go:[0-9]+:'

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZTIME each (default 30s)
	@set -e; for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
	  pkg=$$(dirname $$f); \
	  for t in $$(grep -o '^func Fuzz[A-Za-z0-9_]*' $$f | cut -d' ' -f2); do \
	    echo "== $$pkg $$t ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZE) $$pkg; \
	  done; \
	done

.PHONY: clean
clean: ## Remove build output
	rm -rf bin/
