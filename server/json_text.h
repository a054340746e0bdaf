/* json_text.h - reading a JSON text as the whole of a body or a line:
 * what cJSON's own entry points leave to the caller.  The server's
 * request bodies, `rrnserve run --jsonl`'s lines and training's JSONL
 * lines are all read through it, so that the three refuse alike.
 */
#ifndef RRN_JSON_TEXT_H
#define RRN_JSON_TEXT_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* The JSON value that is the whole of text[0..len) (white space around it
 * allowed), or NULL: not JSON, or more after it (cJSON alone takes a
 * value that only begins the text, `{"a": 1} x`). */
cJSON *json_parse_whole(const char *text, size_t len);
/* Whether a string of the JSON text (as json_parse_whole took it) holds
 * U+0000, written \u0000: cJSON ends its strings at a NUL, so such a
 * string would be read cut short without a word. */
int json_holds_nul(const char *text, size_t len);

#endif
