/* fixtures.h - the committed fixtures of tests/fixtures/ (made by
 * make_fixtures.py): NAME.safetensors, a model, beside NAME.json, what
 * the reference implementation computed with it. */
#ifndef RRN_TEST_FIXTURES_H
#define RRN_TEST_FIXTURES_H

#include <cjson/cJSON.h>

/* Relative: the tests run from the repository root. */
#define FIXTURES_DIR "tests/fixtures"

/* NAME.json, parsed; fails the test when it is missing or not JSON. */
cJSON *fixture_json(const char *name);

#endif
