/* fixtures.c - reading the fixtures of fixtures.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fixtures.h"

#include <stdio.h>
#include <stdlib.h>

#include "files.h"

cJSON *fixture_json(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, FIXTURES_DIR "/%s.json", name);
    char *text = file_must_read(path, NULL);
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!j)
        fail_msg("%s is not JSON", path);
    return j;
}
