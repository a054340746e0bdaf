/* filter.h - RRN_TEST_FILTER, a cmocka name pattern ('*' and '?'): when
 * set, a test binary runs only the tests it matches.  make test-cuda-emu
 * uses it to run the CUDA variants alone on the emulator. */
#ifndef RRN_TEST_FILTER_H
#define RRN_TEST_FILTER_H

/* Call before running the group. */
void test_filter_from_env(void);

#endif
