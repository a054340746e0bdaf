/* json_text.c - reading a JSON text whole (see json_text.h). */
#include <string.h>

#include "json_text.h"

cJSON *json_parse_whole(const char *text, size_t len)
{
    const char *end = NULL;
    cJSON *v = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (v && end)
        while (end < text + len && strchr(" \t\r\n", *end))
            end++;
    if (v && end == text + len)
        return v;
    cJSON_Delete(v);
    return NULL;
}

int json_holds_nul(const char *text, size_t len)
{
    /* A valid JSON text has a backslash only in a string, where it
     * begins an escape: the escape after it is skipped, so an escaped
     * quote or backslash cannot be taken for one that ends a string. */
    int in_string = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == '"')
            in_string = !in_string;
        else if (in_string && text[i] == '\\' && i + 1 < len) {
            if (len - i >= 6 && text[i + 1] == 'u' && memcmp(text + i + 2, "0000", 4) == 0)
                return 1;
            i++;
        }
    }
    return 0;
}
