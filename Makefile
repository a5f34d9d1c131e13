# kvalign build. `make` builds ./kvalign: with the CUDA backend when nvcc is
# on the PATH (csrc/libkvalign.a, build tag cuda), else CPU-only, saying so.
GO      ?= go
NVCC    ?= $(shell command -v nvcc 2>/dev/null)
GOFILES := $(shell find . -name '*.go' -not -path './bin/*' 2>/dev/null)
CSRC    := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h)

ifneq ($(NVCC),)
TAGS := -tags cuda
LIB  := csrc/libkvalign.a
else
TAGS :=
LIB  :=
endif

.PHONY: all test cuda-test-bin lib clean fmt vet

all: kvalign

# The old binary goes first: go build keeps an existing output whose Go
# inputs are unchanged, and the kernel library is not one of its inputs (a
# rebuilt libkvalign.a would otherwise leave a stale ./kvalign).
kvalign: $(GOFILES) $(LIB) go.mod
ifeq ($(NVCC),)
	@echo "make: nvcc not found: building a CPU-only kvalign (scripts/install-cuda-toolkit.sh installs nvcc)"
endif
	rm -f kvalign
	$(GO) build $(TAGS) -o kvalign .

lib: csrc/libkvalign.a

csrc/libkvalign.a: $(CSRC) csrc/Makefile
	$(MAKE) -C csrc -j$$(nproc)

# The CPU test suite: runs everywhere, no GPU needed.
test:
	$(GO) test ./...

# Test binaries of every package with the CUDA backend, for a GPU machine
# (which may have no Go): bin/<pkg>.test, plus ./kvalign.
cuda-test-bin: csrc/libkvalign.a
	@rm -rf bin && mkdir -p bin  # no stale outputs: see the kvalign target
	@for p in $$($(GO) list ./...); do \
		n=$$(basename $$p); [ "$$p" = "github.com/kvalign/kvalign" ] && continue; \
		$(GO) test -c -tags cuda -o bin/$$n.test $$p || exit 1; \
	done
	$(GO) build -tags cuda -o bin/kvalign .

fmt:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }

vet:
	$(GO) vet ./...

clean:
	rm -rf kvalign bin
	-$(MAKE) -C csrc clean
