# rrnserve - build, test and benchmark.
#
#   make            build ./rrnserve (CUDA parts too when nvcc is found; CUDA=0 turns them off)
#   make deps       install the Debian packages the build, tests and benchmarks need
#   make test       build and run every test, then again in a build without CUDA and
#                   under ASan+UBSan, the threaded ones under ThreadSanitizer with a short soak,
#                   the CUDA backend's tests on the CPU emulator, the fuzz targets
#                   briefly, and the server tests under valgrind
#   make test-tsan  the batcher's, the server's and the CPU engine's threaded tests and a
#                   30 s soak under ThreadSanitizer
#   make test-cuda-emu  the CUDA backend's kernels and host code on tests/cuda_emu
#   make emu-rrnserve   build/emu-nosan/rrnserve: rrnserve on that emulator, unsanitized
#   make bench      run the benchmarks
#   make bench-server  the HTTP server under load, batching on and off
#   make serve      build and serve the shipped models
#   make install    install the binary, the systemd unit, its options and the models
#                   (PREFIX=/usr/local, DESTDIR= for staging; see README.md, "Deployment")
#   make fuzz       build the libFuzzer targets of fuzz/ and run each FUZZ_SECONDS (default 60)
#   make test-fuzz  the same, 15 seconds each (part of make test)
#   make test-valgrind  the server tests with the server under valgrind memcheck

# The first rule make reads would be the goal of a bare `make`; the build
# folders' .flags rules come before `all`, so name it.
.DEFAULT_GOAL := all

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
LDLIBS  := -lmicrohttpd -lcjson -lcrypto -lopenblas -llapacke -lunistring -lm -lpthread

# CPU-only and CUDA builds live apart, so switching CUDA= never links
# objects compiled for the other.
BUILD   := build/$(if $(filter 1,$(CUDA)),cuda,cpu)
ENGINE_SRC := $(wildcard engine/*.c)
SERVER_SRC := $(wildcard server/*.c)
TRAIN_SRC  := $(wildcard train/*.c)
CLI_SRC    := $(wildcard cli/*.c)
TEST_SRC   := $(wildcard tests/test_*.c)
SUPPORT_SRC := $(wildcard tests/support/*.c)

# Extra -D flags for engine/*.cu alone (CUDA_DEFS=-DFUSED_ROWS_MAX=32: the
# benchmark's tile variants, built by tools/gpu-bundle.sh into a BUILD or
# EMU folder of their own).
CUDA_DEFS ?=

# The CUDA backend is a shared library of its own (engine/backend.c says
# why), the only part that links the CUDA runtime and cuBLAS: a build
# folder's binary finds it beside itself, its tests and benchmarks one
# folder up, an installed binary in ../lib/rrnserve.
CUDA_LIBRARY := librrnserve-cuda.so
CUDA_CFLAGS  := -DRRN_CUDA -DRRN_CUDA_LIBRARY='"$(CUDA_LIBRARY)"'
# An old-style DT_RPATH, not a DT_RUNPATH: the loader reads a binary's
# RUNPATH only for a dlopen that the binary itself calls, and under ASan
# the caller is ASan's runtime, which intercepts dlopen.
RPATH_BIN  := -Wl,--disable-new-dtags,-rpath,'$$ORIGIN:$$ORIGIN/../lib/rrnserve'
RPATH_SUB  := -Wl,--disable-new-dtags,-rpath,'$$ORIGIN/..'
ifeq ($(CUDA),1)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
# The NVIDIA driver's library, which backend.c looks for before it loads
# the CUDA library (the emulator has none, and does without).
CFLAGS  += $(CUDA_CFLAGS) -DRRN_CUDA_DRIVER='"libcuda.so.1"' -I$(CUDA_HOME)/include
CUDA_LDLIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lstdc++
# Machine code for Ampere (sm_80, which 8.6 and 8.9 run too) and Hopper,
# and Hopper's PTX, which the driver compiles when the library loads on a
# later GPU (Blackwell), where machine code for neither would run.
NVFLAGS := -O2 -std=c++17 -Iengine -DRRN_CUDA $(CUDA_DEFS) -MMD -MP \
           --compiler-options -Wall,-Wextra,-Werror,-fPIC,-fvisibility=hidden \
           -gencode arch=compute_90,code=[sm_90,compute_90] -gencode arch=compute_80,code=sm_80
endif

# $(1) as one word of sh, within single quotes.
sh_quote = '$(subst ','\'',$(1))'

# $(1): build folder, $(2): extra compiler flags.  One rule set serves the
# plain build and the sanitizer build.  $(1)/.flags holds the commands'
# flags, rewritten (and so newer than every object) when they change, as
# git's Makefile does: make alone compares only times, and would keep
# objects built with other flags.
define objects
flags_$(1) = $$(CC) $$(CFLAGS) $(2) $$(NVCC) $$(NVFLAGS)
$(1)/.flags: FORCE
	@mkdir -p $$(@D)
	@printf '%s\n' $$(call sh_quote,$$(flags_$(1))) | cmp -s - $$@ || printf '%s\n' $$(call sh_quote,$$(flags_$(1))) > $$@
$(1)/%.o: %.c $(1)/.flags
	@mkdir -p $$(dir $$@)
	@echo "  CC      $$@"
	@$$(CC) $$(CFLAGS) $(2) -c $$< -o $$@
$(1)/%.cu.o: %.cu $(1)/.flags
	@mkdir -p $$(dir $$@)
	@echo "  NVCC    $$@"
	@$$(NVCC) $$(NVFLAGS) -c $$< -o $$@
endef

SAN  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
TSAN := -fsanitize=thread
$(eval $(call objects,$(BUILD),))

# Everything but main(): what the binary and every test link.
lib_objs    = $(ENGINE_SRC:%.c=$(1)/%.o) $(SERVER_SRC:%.c=$(1)/%.o) $(TRAIN_SRC:%.c=$(1)/%.o)
# The CUDA library a build folder's binaries load (order-only prerequisites:
# it is not linked, and a new one needs no new binary).
cuda_lib    = $(if $(filter 1,$(CUDA)),$(1)/$(CUDA_LIBRARY))
cli_objs    = $(CLI_SRC:%.c=$(1)/%.o)
test_bins   = $(TEST_SRC:tests/%.c=$(1)/tests/%)
# The harness the tests share (tests/support/: servers, HTTP, commands,
# files), linked into every test binary.
support_objs = $(SUPPORT_SRC:%.c=$(1)/%.o)

# Keep object files make would otherwise delete as intermediates.
.SECONDARY:

.PHONY: FORCE all rrnserve deps deps-bench test test-builds test-plain test-cpu-only test-asan test-tsan test-cuda-emu emu-rrnserve bench bench-gpu bench-server serve clean fixtures install uninstall fuzz test-fuzz \
        deps-fuzz test-valgrind deps-valgrind
# A CUPTI injection library for the GPU machine, where Nsight Systems makes
# no report (tools/cupti_trace.c; tools/gpu-run.sh profile): built with the
# CUDA parts when the toolkit has CUPTI.
CUPTI_TRACE := $(if $(filter 1,$(CUDA)),$(if $(wildcard $(CUDA_HOME)/include/cupti.h),$(BUILD)/tools/libcupti_trace.so))

all: rrnserve $(CUPTI_TRACE)

$(BUILD)/tools/libcupti_trace.so: tools/cupti_trace.c
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	@$(CC) $(CFLAGS) -fPIC -shared -o $@ $< -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcupti -lpthread

# Each build's binary in its folder; ./rrnserve is a link to the one this
# make chose (phony, so that switching CUDA= always switches it).  The
# library is its prerequisite too: .SECONDARY makes every file
# intermediate, and make does not remake a missing intermediate that is
# only order-only.
$(BUILD)/rrnserve: $(call lib_objs,$(BUILD)) $(call cli_objs,$(BUILD)) | $(call cuda_lib,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(RPATH_BIN)
rrnserve: $(BUILD)/rrnserve $(call cuda_lib,$(BUILD))
	@ln -sfn $< $@

# $(1): build folder, $(2): its CUDA objects, $(3): flags and libraries.
# -z defs: whatever the library needs, it links, since nothing else will.
define cuda_library
$(1)/$(CUDA_LIBRARY): $(2)
	@echo "  LINK    $$@"
	@$$(CC) -shared -Wl,-z,defs -o $$@ $$^ $(3)
endef
$(eval $(call cuda_library,$(BUILD),$(CU_SRC:%.cu=$(BUILD)/%.cu.o),$(CUDA_LDLIBS)))

# Static pattern rules: a bare $(BUILD)/tests/% would also offer itself
# for the support objects below tests/.
$(call test_bins,$(BUILD)): $(BUILD)/tests/%: $(BUILD)/tests/%.o $(call support_objs,$(BUILD)) \
                           $(call lib_objs,$(BUILD)) | $(call cuda_lib,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(RPATH_SUB) -lcmocka -lpng -lssl

# $(1): build folder, $(2): sanitizer flags.  A sanitized build's objects,
# CUDA library, binary and tests: ASan+UBSan's and ThreadSanitizer's.
define sanitized_build
$(call objects,$(1),$(2))
$(call cuda_library,$(1),$(CU_SRC:%.cu=$(1)/%.cu.o),$(CUDA_LDLIBS))
$(call test_bins,$(1)): $(1)/tests/%: $(1)/tests/%.o $(call support_objs,$(1)) $(call lib_objs,$(1)) | $(call cuda_lib,$(1))
	@echo "  LINK    $$@"
	@$$(CC) $$(CFLAGS) $(2) -o $$@ $$^ $$(LDLIBS) $$(RPATH_SUB) -lcmocka -lpng -lssl
$(1)/rrnserve: $(call lib_objs,$(1)) $(call cli_objs,$(1)) | $(call cuda_lib,$(1))
	@echo "  LINK    $$@"
	@$$(CC) $$(CFLAGS) $(2) -o $$@ $$^ $$(LDLIBS) $$(RPATH_BIN)
endef
$(eval $(call sanitized_build,$(BUILD)/asan,$(SAN)))
$(eval $(call sanitized_build,$(BUILD)/tsan,$(TSAN)))

# deps installs what is missing (nothing when all is there); the targets
# that need packages run it first, so a fresh machine needs no other step.
deps:
	@tools/install-deps.sh
deps-bench:
	@tools/install-deps.sh --bench

# Every test binary runs from the repository root; RRN_BIN tells the CLI
# tests which binary to drive.  Everything is built first, on every core
# (five builds of the sources: nvcc's, without CUDA, ASan's, the emulator's
# and clang's for fuzzing), then the tests run one phase at a time, since
# some of them time what they see.
NPROC := $(shell nproc 2>/dev/null || echo 1)
test: deps deps-fuzz deps-valgrind
	@$(MAKE) --no-print-directory -j$(NPROC) test-builds
	@$(MAKE) --no-print-directory test-plain test-cpu-only test-asan test-tsan test-cuda-emu test-fuzz test-valgrind

# OpenBLAS picks its kernels by the CPU, or by OPENBLAS_CORETYPE where it is
# set, and the bits of a training product follow them: the tests of bits run
# again with the other of this CPU's own kernels and the AVX2 ones.
test-plain: rrnserve $(CUPTI_TRACE) $(call test_bins,$(BUILD))
	@tests/run_tests.sh $(BUILD) ./rrnserve
	@if [ -n "$$OPENBLAS_CORETYPE" ]; then set -- env -u OPENBLAS_CORETYPE; \
	elif grep -qw avx2 /proc/cpuinfo; then set -- env OPENBLAS_CORETYPE=Haswell; \
	else echo "the tests of bits again: no other OpenBLAS kernels on this CPU"; exit 0; fi; \
	out=$$(RRN_TEST_FILTER='*_bits' "$$@" tests/run_tests.sh $(BUILD) ./rrnserve test_gemm test_engine); rc=$$?; \
	if [ $$rc -ne 0 ]; then printf '%s\n' "$$out"; fi; echo "the tests of bits again ($$*): $${out##*: }"; exit $$rc

# With CUDA, the build without it too: what RRN_CUDA leaves out must still
# build, every test binary included, and work on a machine without the
# toolkit.  RRN_CUDA changes only engine/backend.c (the CUDA backend
# compiled in or not), so what runs there are the tests of what it
# decides: the command line (--version, --device), a server asked for
# cuda or auto, and the server whole; the rest is test-plain's code to
# the byte.  Without CUDA, test-plain is that build already.
CPU_ONLY_TESTS := test_cli test_faults test_server
test-cpu-only:
ifeq ($(CUDA),1)
	@$(MAKE) --no-print-directory CUDA=0 build/cpu/rrnserve $(call test_bins,build/cpu)
	@tests/run_tests.sh build/cpu build/cpu/rrnserve $(CPU_ONLY_TESTS)
endif

test-asan: $(BUILD)/asan/rrnserve $(call test_bins,$(BUILD)/asan)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    tests/run_tests.sh $(BUILD)/asan $(BUILD)/asan/rrnserve

# ThreadSanitizer, on the build without CUDA (whose runtime it could not
# see into): the tests that run the batcher's and the server's threads and
# the CPU backend's worker pool (test_engine, test_gemm, test_pool), then a 30 s
# soak, whose load and churn (reloads under load, /metrics scraped,
# clients leaving streams) cross those threads as the tests, one request
# at a time, do not.  halt_on_error: a server stops at its first
# report, which fails the test or the soak that started it.
TSAN_BUILD := build/cpu/tsan
TSAN_TESTS := test_batcher test_server test_faults test_replicas test_engine test_gemm test_pool
TSAN_BINS  := $(TSAN_BUILD)/rrnserve $(TSAN_TESTS:%=$(TSAN_BUILD)/tests/%) build/cpu/bench/loadgen
test-tsan:
	@$(MAKE) --no-print-directory CUDA=0 $(TSAN_BINS)
	@export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1; \
	    tests/run_tests.sh $(TSAN_BUILD) $(TSAN_BUILD)/rrnserve $(TSAN_TESTS) && \
	    RRN_BIN=$(TSAN_BUILD)/rrnserve SOAK_SECONDS=30 tests/soak.sh build/cpu/bench/loadgen

fixtures:
	$(PYTHON) tests/fixtures/make_fixtures.py tests/fixtures
	$(PYTHON) tests/fixtures/make_utf8_cases.py tests/fixtures/utf8_cases.txt

bench: deps-bench
	@$(MAKE) --no-print-directory rrnserve $(BUILD)/bench/bench_engine $(BUILD)/bench/bench_gemm
	@bench/run_bench.sh $(BUILD)/bench

# On a machine with a CUDA GPU and a python3 that has PyTorch for it
# (PYTHON=...): the engine against cuDNN; writes bench/gpu-out/.
bench-gpu: deps
	@$(MAKE) --no-print-directory CUDA=1 rrnserve build/cuda/bench/bench_engine build/cuda/bench/loadgen
	@bench/run_bench_gpu.sh build/cuda/bench bench/gpu-out

# Needs python3-numpy besides the build's packages, for the random models
# (the script says so when it is missing).
bench-server: deps
	@$(MAKE) --no-print-directory rrnserve $(BUILD)/bench/loadgen
	@bench/run_bench_server.sh $(BUILD)/bench/loadgen

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(call lib_objs,$(BUILD)) | $(call cuda_lib,$(BUILD))
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(RPATH_SUB)

serve: deps
	@$(MAKE) --no-print-directory rrnserve
	./rrnserve serve

# ---- the CUDA backend on a CPU emulator ------------------------------------
# engine/*.cu built by g++ against the emulated CUDA runtime and
# cuBLAS of tests/cuda_emu, with ASan and UBSan, so that its kernels and its
# host code run in the tests of a machine without a GPU: the CUDA variants of
# the tests that have them (EMU_FILTER), and the server's tests whole (in
# this build --device auto finds the emulated GPU).  It checks what a GPU
# would fault on or silently get wrong; it is not a GPU, and says nothing of
# speed.
EMU          := build/emu
# Longest first: they run two at a time (RRN_TEST_JOBS), since each computes
# alone on one core and times nothing; the server's tests then run alone.
EMU_TESTS    := test_gradcheck test_engine test_train test_fixtures test_optim test_faults
EMU_FILTER   := *cuda*
EMU_WHOLE    := test_server
EMU_CXXFLAGS := -std=c++17 -O2 -g -Wall -Wextra -Werror -fPIC -fvisibility=hidden -Itests/cuda_emu -Iengine -DRRN_CUDA \
                -MMD -MP $(SAN)
EMU_LIB      := $(ENGINE_SRC:%.c=$(EMU)/%.o) $(SERVER_SRC:%.c=$(EMU)/%.o) $(TRAIN_SRC:%.c=$(EMU)/%.o)
$(eval $(call objects,$(EMU),$(SAN) $(CUDA_CFLAGS) -URRN_CUDA_DRIVER))
EMU_CUDA_OBJS := $(CU_SRC:%.cu=$(EMU)/%.cu.o) $(patsubst %.cc,$(EMU)/%.o,$(wildcard tests/cuda_emu/*.cc))
$(eval $(call cuda_library,$(EMU),$(EMU_CUDA_OBJS),$(SAN) -lopenblas -lstdc++ -lm -lpthread))
# Defined after objects, so that it replaces its nvcc rule in this tree.
$(EMU)/%.cu.o: %.cu $(EMU)/.flags
	@mkdir -p $(dir $@)
	@echo "  CXX     $@"
	@$(CXX) -x c++ $(EMU_CXXFLAGS) $(CUDA_DEFS) -c $< -o $@
$(EMU)/%.o: %.cc $(EMU)/.flags
	@mkdir -p $(dir $@)
	@echo "  CXX     $@"
	@$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(EMU)/rrnserve: $(EMU_LIB) $(call cli_objs,$(EMU)) | $(EMU)/$(CUDA_LIBRARY)
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(LDLIBS) $(RPATH_BIN)
$(EMU_TESTS:%=$(EMU)/tests/%) $(EMU_WHOLE:%=$(EMU)/tests/%): $(EMU)/tests/%: $(EMU)/tests/%.o $(call support_objs,$(EMU)) \
                                                                $(EMU_LIB) | $(EMU)/$(CUDA_LIBRARY)
	@echo "  LINK    $@"
	@$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(LDLIBS) $(RPATH_SUB) -lcmocka -lpng -lssl

# The same without the sanitizers, fast enough to run whole workloads
# through the CUDA backend's arithmetic (tools/precision.sh).
emu-rrnserve:
	@$(MAKE) --no-print-directory SAN= EMU=build/emu-nosan build/emu-nosan/rrnserve

test-cuda-emu: $(EMU)/rrnserve $(EMU_TESTS:%=$(EMU)/tests/%) $(EMU_WHOLE:%=$(EMU)/tests/%)
	@export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1; \
	    RRN_TEST_JOBS=2 RRN_TEST_FILTER='$(EMU_FILTER)' tests/run_tests.sh $(EMU) $(EMU)/rrnserve $(EMU_TESTS) && \
	    tests/run_tests.sh $(EMU) $(EMU)/rrnserve $(EMU_WHOLE)

# ---- fuzzing: libFuzzer with clang, ASan and UBSan, on the CPU build ------
# Each fuzz/fuzz_NAME.c is a target; fuzz/corpus/NAME/ holds its committed
# seeds (read only), build/fuzz/corpus/NAME/ what a run adds to them, and
# build/fuzz/crash-NAME-* what a run found.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS  := -O1 -g -std=c11 -D_POSIX_C_SOURCE=200809L $(WARN) -Iengine -Iserver -Itrain -MMD -MP $(FUZZ_SAN)
FUZZ_LDLIBS  := -lmicrohttpd -lcjson -lcrypto -lopenblas -llapacke -lunistring -lm -lpthread
FUZZ_NAMES   := $(patsubst fuzz/fuzz_%.c,%,$(wildcard fuzz/fuzz_*.c))
FUZZ_BINS    := $(FUZZ_NAMES:%=build/fuzz/fuzz_%)
FUZZ_LIB     := $(ENGINE_SRC:%.c=build/fuzz/%.o) $(SERVER_SRC:%.c=build/fuzz/%.o) $(TRAIN_SRC:%.c=build/fuzz/%.o)

build/fuzz/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  FUZZCC  $@"
	@$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@
build/fuzz/fuzz_%: build/fuzz/fuzz/fuzz_%.o $(FUZZ_LIB)
	@echo "  LINK    $@"
	@$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $^ $(FUZZ_LDLIBS)

# -fork=1 would survive a crash and go on; a plain run stops at the first
# one, which is what CI wants.  OpenBLAS and the batchers run on their own
# threads, so each target gets a generous per-input timeout.
fuzz: deps-fuzz
	@$(MAKE) --no-print-directory $(FUZZ_BINS)
	@fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_NAMES)

test-fuzz: deps-fuzz
	@$(MAKE) --no-print-directory $(FUZZ_BINS)
	@fuzz/run.sh 15 $(FUZZ_NAMES)

deps-fuzz:
	@tools/install-deps.sh --fuzz

# What `make test` builds before it runs anything (after the variables of
# every build above are set).
test-builds: rrnserve $(CUPTI_TRACE) $(call test_bins,$(BUILD)) $(BUILD)/asan/rrnserve $(call test_bins,$(BUILD)/asan) \
             $(EMU)/rrnserve $(EMU_TESTS:%=$(EMU)/tests/%) $(EMU_WHOLE:%=$(EMU)/tests/%) $(FUZZ_BINS) \
             $(if $(filter 0,$(CUDA)),$(TSAN_BINS))
ifeq ($(CUDA),1)
	@$(MAKE) --no-print-directory CUDA=0 build/cpu/rrnserve $(call test_bins,build/cpu) $(TSAN_BINS)
endif

# The server tests (tests/test_server.c) with every server they start run
# under valgrind's memcheck: a definite leak or an invalid access fails them.
# valgrind runs one thread at a time; --fair-sched=yes hands the turn round,
# without it a batcher generating tokens can starve the HTTP threads for
# minutes.  They run the build without CUDA, whose server differs only in
# backend.c: where a driver is installed, the CUDA build's loads cuBLAS,
# whose 600 MB of symbols valgrind reads at every start (17 s a server).
VALGRIND := valgrind --tool=memcheck --fair-sched=yes --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99 \
            --suppressions=tests/valgrind.supp --gen-suppressions=all --num-callers=30
test-valgrind: deps-valgrind
	@$(MAKE) --no-print-directory CUDA=0 build/cpu/rrnserve build/cpu/tests/test_server build/cpu/tests/test_faults
	@RRN_SERVER_WRAPPER="$(VALGRIND)" RRN_BIN=build/cpu/rrnserve build/cpu/tests/test_server
	@RRN_SERVER_WRAPPER="$(VALGRIND)" RRN_BIN=build/cpu/rrnserve build/cpu/tests/test_faults

deps-valgrind:
	@tools/install-deps.sh --valgrind

# Installed paths.  The unit and the options file are written with them
# (paths without DESTDIR, which only stages the files).  The options file
# goes to $(SYSCONFDIR)/rrnserve and is never overwritten: a reinstall
# keeps the local settings.  Training checkpoints (*.ckpt.safetensors) are
# not models to serve.
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
SYSCONFDIR ?= $(PREFIX)/etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
DATADIR    ?= $(PREFIX)/share/rrnserve
MODELDIR   ?= $(DATADIR)/models
# Where the installed binary looks for the CUDA library: ../lib/rrnserve
# from itself (its run path).  The library installed is the one beside
# the binary ./rrnserve links to, where it has one.
CUDALIBDIR := $(abspath $(BINDIR)/../lib/rrnserve)
INSTALL_CUDA_LIBRARY = $(wildcard $(dir $(realpath rrnserve))$(CUDA_LIBRARY))
INSTALL_MODELS := $(filter-out %.ckpt.safetensors,$(wildcard models/*.safetensors))
SUBST = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@MODELDIR@|$(MODELDIR)|g'

install: rrnserve
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/rrnserve $(DESTDIR)$(MODELDIR)
	install -m 0755 rrnserve $(DESTDIR)$(BINDIR)/rrnserve
	$(if $(INSTALL_CUDA_LIBRARY),install -D -m 0644 $(INSTALL_CUDA_LIBRARY) $(DESTDIR)$(CUDALIBDIR)/$(CUDA_LIBRARY))
	$(SUBST) deploy/rrnserve.service > $(DESTDIR)$(UNITDIR)/rrnserve.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/rrnserve.service
	install -m 0644 deploy/rrnserve-gpu.conf $(DESTDIR)$(DATADIR)/rrnserve-gpu.conf
	@env=$(DESTDIR)$(SYSCONFDIR)/rrnserve/rrnserve.env; \
	if [ -e "$$env" ]; then echo "keeping $$env"; \
	else echo "$(SUBST) deploy/rrnserve.env > $$env"; $(SUBST) deploy/rrnserve.env > "$$env" && chmod 0644 "$$env"; fi
	$(if $(INSTALL_MODELS),install -m 0644 $(INSTALL_MODELS) $(DESTDIR)$(MODELDIR)/)

# Removes what install wrote but the options file.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/rrnserve $(DESTDIR)$(UNITDIR)/rrnserve.service $(DESTDIR)$(DATADIR)/rrnserve-gpu.conf \
	      $(DESTDIR)$(CUDALIBDIR)/$(CUDA_LIBRARY)
	-rmdir $(DESTDIR)$(CUDALIBDIR)
	rm -f $(addprefix $(DESTDIR)$(MODELDIR)/,$(notdir $(INSTALL_MODELS)))
	-rmdir $(DESTDIR)$(MODELDIR) $(DESTDIR)$(DATADIR)

clean:
	rm -rf build rrnserve

-include $(shell find $(BUILD) $(EMU) build/fuzz -name '*.d' 2>/dev/null)
