/* filter.c - RRN_TEST_FILTER handed to cmocka (see filter.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "filter.h"

void test_filter_from_env(void)
{
    const char *pattern = getenv("RRN_TEST_FILTER");
    if (pattern && *pattern)
        cmocka_set_test_filter(pattern);
}
