# rrnserve - build, test and benchmark.
#
#   make            build ./rrnserve (CUDA parts too when nvcc is found; CUDA=0 turns them off)
#   make deps       install the Debian packages the build, tests and benchmarks need
#   make test       build and run every test, then again under ASan+UBSan
#   make bench      run the benchmarks
#   make bench-server  the HTTP server under load, batching on and off
#   make serve      build and serve the shipped models

CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
PYTHON  ?= /usr/bin/python3
CU_SRC  := $(wildcard engine/*.cu)
CUDA    ?= $(if $(and $(NVCC),$(CU_SRC)),1,0)

WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
CFLAGS  ?= -O3 -g
# -fno-trapping-math: nothing here uses floating-point traps, and without
# it GCC will not vectorize a loop holding a float comparison (the cell
# kernels clamp before exp).  It changes no result.
CFLAGS  += -std=c11 -D_POSIX_C_SOURCE=200809L -fno-trapping-math $(WARN) -Iengine -Iserver -Itrain -MMD -MP
LDLIBS  := -lmicrohttpd -lcjson -lcrypto -lopenblas -lunistring -lm -lpthread

# CPU-only and CUDA builds live apart, so switching CUDA= never links
# objects compiled for the other.
BUILD   := build/$(if $(filter 1,$(CUDA)),cuda,cpu)
ENGINE_SRC := $(wildcard engine/*.c)
SERVER_SRC := $(wildcard server/*.c)
TRAIN_SRC  := $(wildcard train/*.c)
CLI_SRC    := $(wildcard cli/*.c)
TEST_SRC   := $(wildcard tests/test_*.c)

ifeq ($(CUDA),1)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CFLAGS  += -DRRN_CUDA -I$(CUDA_HOME)/include
LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lstdc++
NVFLAGS := -O2 -std=c++17 -Iengine -DRRN_CUDA -MMD -MP --compiler-options -Wall,-Wextra,-Werror \
           -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80
endif

# $(1): build folder, $(2): extra compiler flags.  One rule set serves the
# plain build and the sanitizer build.
define objects
$(1)/%.o: %.c
	@mkdir -p $$(dir $$@)
	@echo "  CC      $$@"
	@$$(CC) $$(CFLAGS) $(2) -c $$< -o $$@
$(1)/%.cu.o: %.cu
	@mkdir -p $$(dir $$@)
	@echo "  NVCC    $$@"
	@$$(NVCC) $$(NVFLAGS) -c $$< -o $$@
endef

SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
$(eval $(call objects,$(BUILD),))
$(eval $(call objects,$(BUILD)/asan,$(SAN)))

# Everything but main(): what the binary and every test link.
lib_objs    = $(ENGINE_SRC:%.c=$(1)/%.o) $(SERVER_SRC:%.c=$(1)/%.o) $(TRAIN_SRC:%.c=$(1)/%.o) $(if $(filter 1,$(CUDA)),$(CU_SRC:%.cu=$(1)/%.cu.o))
cli_objs    = $(CLI_SRC:%.c=$(1)/%.o)
test_bins   = $(TEST_SRC:tests/%.c=$(1)/tests/%)

# Keep object files make would otherwise delete as intermediates.
.SECONDARY:

.PHONY: all deps deps-bench test test-plain test-asan bench bench-server serve clean fixtures
all: rrnserve

rrnserve: $(call lib_objs,$(BUILD)) $(call cli_objs,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(call lib_objs,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) -lcmocka -lpng
$(BUILD)/asan/tests/%: $(BUILD)/asan/tests/%.o $(call lib_objs,$(BUILD)/asan)
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(LDLIBS) -lcmocka -lpng
$(BUILD)/asan/rrnserve: $(call lib_objs,$(BUILD)/asan) $(call cli_objs,$(BUILD)/asan)
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(LDLIBS)

# deps installs what is missing (nothing when all is there); the targets
# that need packages run it first, so a fresh machine needs no other step.
deps:
	@tools/install-deps.sh
deps-bench:
	@tools/install-deps.sh --bench

# Every test binary runs from the repository root; RRN_BIN tells the CLI
# tests which binary to drive.
test: deps
	@$(MAKE) --no-print-directory test-plain test-asan

test-plain: rrnserve $(call test_bins,$(BUILD))
	@tests/run_tests.sh $(BUILD) ./rrnserve

test-asan: $(BUILD)/asan/rrnserve $(call test_bins,$(BUILD)/asan)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    tests/run_tests.sh $(BUILD)/asan $(BUILD)/asan/rrnserve

fixtures:
	$(PYTHON) tests/fixtures/make_fixtures.py tests/fixtures

bench: deps-bench
	@$(MAKE) --no-print-directory rrnserve $(BUILD)/bench/bench_engine $(BUILD)/bench/bench_gemm
	@bench/run_bench.sh $(BUILD)/bench

# Needs python3-numpy besides the build's packages, for the random models
# (the script says so when it is missing).
bench-server: deps
	@$(MAKE) --no-print-directory rrnserve $(BUILD)/bench/loadgen
	@bench/run_bench_server.sh $(BUILD)/bench/loadgen

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(call lib_objs,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

serve: deps
	@$(MAKE) --no-print-directory rrnserve
	./rrnserve serve

clean:
	rm -rf build rrnserve

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
